"""Read a GGUF file's metadata and tensor sizes into a ``ModelProfile``.

Only the header is read (the file is memory-mapped and no tensor data is touched).
Profiles are cached by (path, size, modification time), so asking again for an unchanged file
costs one ``stat``.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import struct
from pathlib import Path

from corral.placement.profile import ModelProfile, profile_from_fields

# Large tokenizer arrays: only their length matters (the vocabulary size), decoding 150k strings
# would cost a second per read.
_LENGTH_ONLY = {"tokenizer.ggml.tokens"}
_SKIPPED_PREFIX = "tokenizer."


def read_profile(path: str | os.PathLike[str]) -> ModelProfile:
    """The profile of the GGUF file at ``path``.

    Raises ``OSError`` when the file cannot be read and ``ValueError`` when it is not a GGUF
    model corral understands (the message names the missing key).
    """
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _read_cached(str(resolved), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _read_cached(path: str, size: int, mtime_ns: int) -> ModelProfile:
    # size and mtime_ns are only part of the cache key: a rewritten file is read again.
    del size, mtime_ns
    fields, tensors = read_header(path)
    try:
        return profile_from_fields(fields, tensors)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def read_header(path: str) -> tuple[dict[str, object], list[tuple[str, int]]]:
    """The metadata (tokenizer strings skipped) and each tensor's byte size.

    ``gguf.GGUFReader`` builds an object for every element of every array, which takes five
    seconds for a 49k-token vocabulary; corral needs the hyper-parameters and tensor sizes only.
    This scanner walks the same header, skipping string arrays by their lengths, and takes
    the type sizes from the ``gguf`` package's own tables.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        scan = _Scanner(data)
        if scan.take(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version = scan.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        n_tensors, n_kv = scan.unpack("<Q"), scan.unpack("<Q")
        fields: dict[str, object] = {}
        for _ in range(n_kv):
            key = scan.string()
            kind = scan.unpack("<I")
            keep = key in _LENGTH_ONLY or not key.startswith((_SKIPPED_PREFIX, "GGUF."))
            value = scan.value(kind, keep=keep)
            if key in _LENGTH_ONLY and isinstance(value, int):
                fields[key] = range(value)
            elif keep:
                fields[key] = value
        tensors = []
        for _ in range(n_tensors):
            name = scan.string()
            dims = [scan.unpack("<Q") for _ in range(scan.unpack("<I"))]
            ggml_type = GGMLQuantizationType(scan.unpack("<I"))
            scan.unpack("<Q")  # offset of the data
            block, type_size = GGML_QUANT_SIZES[ggml_type]
            tensors.append((name, math.prod(dims) // block * type_size))
    return fields, tensors


# Struct formats of GGUF's scalar value types, by type number.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Scanner:
    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + n]
        if len(chunk) != n:
            raise ValueError("the GGUF header is truncated")
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        (value,) = struct.unpack_from(fmt, self.take(size))
        return int(value) if not isinstance(value, float) else value  # type: ignore[return-value]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", "replace")

    def value(self, kind: int, keep: bool) -> object:
        if kind in _SCALARS:
            fmt = _SCALARS[kind]
            (value,) = struct.unpack_from(fmt, self.take(struct.calcsize(fmt)))
            return value
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item in _SCALARS:
                size = struct.calcsize(_SCALARS[item])
                raw = self.take(size * count)
                if not keep:
                    return count
                return list(struct.unpack_from(f"<{count}{_SCALARS[item][1]}", raw))
            if item == _STRING:
                for _ in range(count):  # skip each string by its length
                    self.pos += 8 + struct.unpack_from("<Q", self.data, self.pos)[0]
                return count  # string arrays: only their length is kept
            return [self.value(item, keep) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {kind}")


def clear_cache() -> None:
    """Forget every cached profile (tests rewrite files within one mtime tick)."""
    _read_cached.cache_clear()
