"""corral's own table of GGML type sizes, which spares ``corral serve`` importing ``gguf``
(and numpy) before it listens, must agree with the ``gguf`` package's."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from corral.probe.ggml_types import GGML_TYPE_SIZES, type_size
from corral.probe.gguf import read_header


def test_table_agrees_with_gguf() -> None:
    theirs = {int(t): size for t, size in gguf.GGML_QUANT_SIZES.items()}
    assert {t: theirs.get(t) for t in GGML_TYPE_SIZES} == GGML_TYPE_SIZES


def test_a_type_missing_from_the_table_comes_from_gguf(monkeypatch: pytest.MonkeyPatch) -> None:
    # A newer gguf package knows a type this table does not list yet.
    monkeypatch.delitem(GGML_TYPE_SIZES, int(gguf.GGMLQuantizationType.Q4_K))
    assert type_size(int(gguf.GGMLQuantizationType.Q4_K)) == (256, 144)


def test_an_unknown_type_names_the_file_and_the_type(tmp_path: Path) -> None:
    path = tmp_path / "odd.gguf"
    # GGUF v3, one tensor, no metadata: name "t", 1 dimension of 32, type 250, offset 0.
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + struct.pack("<Q", 1) + b"t"
                     + struct.pack("<IQIQ", 1, 32, 250, 0))
    with pytest.raises(ValueError, match=r"odd\.gguf: unsupported tensor type 250"):
        read_header(str(path))


def test_serving_imports_neither_gguf_nor_numpy(smollm2: Path) -> None:
    # What `corral serve` imports and reads before it listens (cli.serve, server.serve).
    code = ("import sys, corral.cli, corral.server\n"
            "from corral.probe.gguf import read_profile\n"
            f"read_profile({str(smollm2)!r})\n"
            "print(sorted(m for m in ('gguf', 'numpy', 'huggingface_hub', 'aiohttp', 'yarl')\n"
            "             if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
