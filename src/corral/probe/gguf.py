"""Read a GGUF file's metadata and tensor sizes into a ``ModelProfile``.

Only the header is read (the file is memory-mapped and no tensor data is touched). A model
split into shards (``name-00001-of-00003.gguf``) is read shard by shard, as llama-server loads
it. Profiles are cached by (path, size, modification time) of the file and of every shard, so
asking again for an unchanged model costs one ``stat`` per file.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import re
import struct

from corral.placement.profile import ModelProfile, profile_from_fields
from corral.probe.ggml_types import type_size

# Large tokenizer arrays: only their length matters (the vocabulary size), decoding 150k strings
# would cost a second per read.
_LENGTH_ONLY = {"tokenizer.ggml.tokens"}
_SKIPPED_PREFIX = "tokenizer."
# Tokenizer keys that are small and describe the model (the Ollama API shows them): kept.
_KEPT = frozenset({"tokenizer.chat_template", "tokenizer.ggml.fim_pre_token_id",
                   "tokenizer.ggml.model"})


def read_profile(path: str | os.PathLike[str]) -> ModelProfile:
    """The profile of the GGUF model at ``path``, every shard of it when it is split.

    A split model (``name-00001-of-00003.gguf`` with ``split.count`` in its metadata) is
    profiled from the tensors of all its shards: llama-server loads them all from the first
    path. Raises ``OSError`` when a file cannot be read (a missing shard is named) and
    ``ValueError`` when it is not a GGUF model corral understands (the message names the
    missing key).
    """
    # Absolute but not resolved: shards are found beside the path as given, as llama.cpp
    # does, and the Hugging Face cache links each shard to a differently named blob.
    first = os.path.abspath(path)
    shards = _named_shards(first)
    key = (_stat(first, missing_ok=False), *(_stat(s, missing_ok=True) for s in shards[1:]))
    return _read_cached(first, key)


def _stat(path: str, missing_ok: bool) -> tuple[str, int, int]:
    """(path, size, mtime) for the cache key; (path, -1, -1) for a missing shard."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        if not missing_ok:
            raise
        return (path, -1, -1)
    return (path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _read_cached(path: str, files: tuple[tuple[str, int, int], ...]) -> ModelProfile:
    # ``files`` (path, size and mtime of the file and of each shard its name implies) is only
    # the cache key: rewriting, adding or removing any shard reads the model again.
    del files
    fields, tensors = read_header(path)
    count = fields.get("split.count", 0)
    if isinstance(count, int) and count > 1:
        tensors = tensors + _other_shards(path, fields, count, len(tensors))
    try:
        return profile_from_fields(fields, tensors)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


# llama.cpp names shards "%s-%05d-of-%05d.gguf" (llama_split_path), numbered from 1.
_SHARD_NAME = re.compile(r"-(\d{5,})-of-(\d{5,})\.gguf$")


def split_paths(path: str, count: int) -> list[str]:
    """The paths of all ``count`` shards of a split model whose first shard is ``path``.

    The names llama.cpp derives (``llama_split_prefix``, then ``llama_split_path``): the first
    file's name ends in ``-00001-of-<count>.gguf`` and every shard shares its prefix. Raises
    ``ValueError`` when ``path`` is not named so, which llama-server refuses too ("invalid split
    file name").
    """
    suffix = f"-{1:05d}-of-{count:05d}.gguf"
    if len(path) <= len(suffix) or not path.endswith(suffix):
        raise ValueError(
            f"{path}: the model is split into {count} files, so its name must end in "
            f"{suffix!r} (llama-server finds the other shards by that name)"
        )
    prefix = path[: -len(suffix)]
    return [f"{prefix}-{number:05d}-of-{count:05d}.gguf" for number in range(1, count + 1)]


def _named_shards(path: str) -> list[str]:
    """The shards a first shard's name implies; [path] for any other name.

    Only for the cache key: read off the name so that asking again costs a few ``stat`` calls
    and no read. The file's own ``split.count`` decides what is read.
    """
    match = _SHARD_NAME.search(path)
    if match is None or int(match.group(1)) != 1 or int(match.group(2)) < 2:
        return [path]
    return split_paths(path, int(match.group(2)))


def _other_shards(
    path: str, fields: dict[str, object], count: int, n_first: int
) -> list[tuple[str, int]]:
    """Tensor sizes of shards 2..count, checked as llama.cpp's loader checks them."""
    number = fields.get("split.no", 0)
    if number != 0:
        shown = number + 1 if isinstance(number, int) else number
        raise ValueError(
            f"{path}: this is shard {shown} of {count}; configure the first shard (its name "
            "ends in -00001-of-...), llama-server loads the others from it"
        )
    tensors: list[tuple[str, int]] = []
    for index, shard in enumerate(split_paths(path, count)[1:], start=1):
        if not os.path.exists(shard):
            raise FileNotFoundError(
                f"{path}: shard {index + 1} of {count} of this split model is missing: {shard}"
            )
        shard_fields, shard_tensors = read_header(shard)
        if shard_fields.get("split.no") != index:
            raise ValueError(
                f"{shard}: split.no is {shard_fields.get('split.no')!r}, expected {index} "
                f"(shard {index + 1} of {count})"
            )
        tensors += shard_tensors
    expected = fields.get("split.tensors.count")
    found = n_first + len(tensors)
    if isinstance(expected, int) and expected != found:
        raise ValueError(f"{path}: split.tensors.count is {expected} but the {count} shards "
                         f"hold {found} tensors")
    return tensors


def read_header(path: str) -> tuple[dict[str, object], list[tuple[str, int]]]:
    """The metadata (tokenizer strings skipped) and each tensor's byte size.

    ``gguf.GGUFReader`` builds an object for every element of every array, which takes five
    seconds for a 49k-token vocabulary; corral needs the hyper-parameters and tensor sizes only.
    This scanner walks the same header, skipping string arrays by their lengths, and takes
    the type sizes from ``corral.probe.ggml_types``. Raises ``OSError`` when the file
    cannot be read and ``ValueError`` (naming the file) for anything it cannot make sense of.
    """
    try:
        return _scan_header(path)
    except struct.error:
        # String arrays are skipped by their lengths, which may point past the end.
        raise ValueError(f"{path}: the GGUF header is truncated") from None
    except KeyError as exc:
        raise ValueError(f"{path}: unsupported tensor type {exc.args[0]}") from None
    except (ValueError, OverflowError, MemoryError) as exc:
        reason = str(exc).removeprefix(f"{path}: ")
        raise ValueError(f"{path}: {reason}") from None


def _scan_header(path: str) -> tuple[dict[str, object], list[tuple[str, int]]]:
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
            keep = (key in _LENGTH_ONLY or key in _KEPT
                    or not key.startswith((_SKIPPED_PREFIX, "GGUF.")))
            value = scan.value(kind, keep=keep)
            if key in _LENGTH_ONLY and isinstance(value, int):
                fields[key] = range(value)
            elif keep:
                fields[key] = value
        tensors = []
        for _ in range(n_tensors):
            name = scan.string()
            dims = [scan.unpack("<Q") for _ in range(scan.unpack("<I"))]
            block, size = type_size(scan.unpack("<I"))
            scan.unpack("<Q")  # offset of the data
            tensors.append((name, math.prod(dims) // block * size))
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


def tensor_bytes(path: str | os.PathLike[str]) -> int:
    """The bytes of every tensor in the GGUF file at ``path`` (a projector's weights).

    Raises ``OSError`` when it cannot be read and ``ValueError`` when it is not GGUF.
    """
    _, tensors = read_header(os.fspath(path))
    return sum(size for _, size in tensors)


def clear_cache() -> None:
    """Forget every cached profile (tests rewrite files within one mtime tick)."""
    _read_cached.cache_clear()
