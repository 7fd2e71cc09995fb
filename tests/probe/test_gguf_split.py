"""Split GGUF models (``name-00001-of-00003.gguf``): the profile counts every shard's tensors.

llama-server loads the other shards from the first path, so a profile of the first file alone
would under-estimate the weights and let the ledger over-commit. Each model here is written
once as a single file and once as shards (by hand, setting the ``split.*`` keys as llama.cpp's
``gguf-split`` does, and by ``gguf.GGUFWriter``'s own splitting); both must give one profile.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import pytest

from corral.probe.gguf import clear_cache, read_profile, split_paths

Q8 = gguf.GGMLQuantizationType.Q8_0
F32 = gguf.GGMLQuantizationType.F32
Tensor = tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]
N_LAYER = 4

FIELDS: dict[str, int] = {
    "llama.block_count": N_LAYER, "llama.embedding_length": 64,
    "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
    "llama.attention.head_count_kv": 2, "llama.context_length": 4096, "llama.vocab_size": 96,
}


def tensors(extra_layer_rows: int = 0) -> list[Tensor]:
    """A small llama: embeddings, N_LAYER blocks of different sizes, a norm and an output."""
    found: list[Tensor] = [("token_embd.weight", (96, 64), Q8)]
    for il in range(N_LAYER):
        rows = 32 * (il + 1) + extra_layer_rows
        found += [(f"blk.{il}.attn_q.weight", (rows, 64), Q8),
                  (f"blk.{il}.attn_norm.weight", (64,), F32)]
    found += [("output_norm.weight", (64,), F32), ("output.weight", (96, 64), Q8)]
    return found


def add_tensors(writer: gguf.GGUFWriter, items: Sequence[Tensor]) -> None:
    for name, shape, qtype in items:
        data = np.zeros(shape, dtype=np.float32)
        if qtype == F32:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def single(path: Path, items: Sequence[Tensor]) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in FIELDS.items():
        writer.add_uint32(key, value)
    add_tensors(writer, items)
    finish(writer)
    return path


def shards(prefix: Path, parts: Sequence[Sequence[Tensor]], n_tensors: int | None = None,
           numbers: Sequence[int] | None = None) -> list[Path]:
    """Write ``parts`` as shards named the way llama.cpp looks for them; the first path first.

    As in llama.cpp's ``gguf-split``: the model's metadata in the first shard only, and
    ``split.no`` (u16), ``split.count`` (u16), ``split.tensors.count`` (i32) in every shard.
    """
    count = len(parts)
    paths = [Path(p) for p in split_paths(f"{prefix}-00001-of-{count:05d}.gguf", count)]
    total = sum(len(p) for p in parts) if n_tensors is None else n_tensors
    for index, (path, part) in enumerate(zip(paths, parts, strict=True)):
        writer = gguf.GGUFWriter(str(path), "llama")
        if index == 0:
            for key, value in FIELDS.items():
                writer.add_uint32(key, value)
        writer.add_uint16("split.no", index if numbers is None else numbers[index])
        writer.add_uint16("split.count", count)
        writer.add_int32("split.tensors.count", total)
        add_tensors(writer, part)
        finish(writer)
    return paths


def three_parts(items: Sequence[Tensor]) -> list[list[Tensor]]:
    # Embeddings and block 0 | blocks 1-2 | block 3, the norm and the output.
    return [list(items[:3]), list(items[3:7]), list(items[7:])]


def test_split_model_profile_equals_the_single_file(tmp_path: Path) -> None:
    whole = read_profile(single(tmp_path / "whole.gguf", tensors()))
    paths = shards(tmp_path / "model", three_parts(tensors()))
    assert [p.name for p in paths] == ["model-00001-of-00003.gguf", "model-00002-of-00003.gguf",
                                       "model-00003-of-00003.gguf"]
    split = read_profile(paths[0])
    assert split.layer_bytes == whole.layer_bytes
    assert len(set(whole.layer_bytes)) == N_LAYER  # every block differs: none was mixed up
    assert (split.token_embd_bytes, split.output_bytes, split.other_bytes) == (
        whole.token_embd_bytes, whole.output_bytes, whole.other_bytes)
    assert split.weight_bytes == whole.weight_bytes
    assert split == whole  # the metadata (in the first shard only) is the same too


def test_gguf_writers_own_split_is_read_whole(tmp_path: Path) -> None:
    whole = read_profile(single(tmp_path / "whole.gguf", tensors()))
    writer = gguf.GGUFWriter(str(tmp_path / "auto.gguf"), "llama", split_max_tensors=4)
    for key, value in FIELDS.items():
        writer.add_uint32(key, value)
    add_tensors(writer, tensors())
    finish(writer)
    assert (tmp_path / "auto-00003-of-00003.gguf").exists()  # 11 tensors, 4 per shard
    assert read_profile(tmp_path / "auto-00001-of-00003.gguf") == whole


def test_a_missing_shard_is_named(tmp_path: Path) -> None:
    paths = shards(tmp_path / "model", three_parts(tensors()))
    paths[1].unlink()
    with pytest.raises(OSError, match=r"shard 2 of 3 .*missing: .*model-00002-of-00003\.gguf"):
        read_profile(paths[0])


def test_cache_key_covers_every_shard(tmp_path: Path) -> None:
    paths = shards(tmp_path / "model", three_parts(tensors()))
    first = read_profile(paths[0])
    assert read_profile(str(paths[0])) is first  # unchanged: cached
    # Rewrite only the last shard with bigger blocks: a new size, so it is read again.
    shards(tmp_path / "model", three_parts(tensors(extra_layer_rows=32)))
    bigger = read_profile(paths[0])
    assert bigger.layer_bytes[3] > first.layer_bytes[3]
    # Same size, new mtime on a middle shard: read again too.
    stat = paths[1].stat()
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert read_profile(paths[0]) is not bigger
    # A shard that goes missing after a successful read is noticed, not served from the cache.
    paths[2].unlink()
    with pytest.raises(OSError, match="shard 3 of 3"):
        read_profile(paths[0])
    clear_cache()


def test_a_later_shard_or_a_wrongly_named_first_is_refused(tmp_path: Path) -> None:
    paths = shards(tmp_path / "model", three_parts(tensors()))
    # llama-server too must be given the first shard ("illegal split file idx").
    with pytest.raises(ValueError, match="shard 2 of 3; configure the first shard"):
        read_profile(paths[1])
    renamed = paths[0].rename(tmp_path / "model.gguf")
    with pytest.raises(ValueError, match=r"must end in '-00001-of-00003\.gguf'"):
        read_profile(renamed)


def test_shards_are_checked_like_llama_cpp_checks_them(tmp_path: Path) -> None:
    wrong_count = shards(tmp_path / "a", three_parts(tensors()), n_tensors=12)
    with pytest.raises(ValueError, match="split.tensors.count is 12 but the 3 shards hold 11"):
        read_profile(wrong_count[0])
    wrong_number = shards(tmp_path / "b", three_parts(tensors()), numbers=[0, 2, 2])
    with pytest.raises(ValueError, match=r"b-00002-of-00003\.gguf: split\.no is 2, expected 1"):
        read_profile(wrong_number[0])


def test_a_file_merely_named_like_a_shard_is_one_file(tmp_path: Path) -> None:
    # No split.count inside: one file, whatever its name says (llama.cpp reads it alone too).
    path = single(tmp_path / "odd-00001-of-00002.gguf", tensors())
    assert read_profile(path) == read_profile(single(tmp_path / "whole.gguf", tensors()))
