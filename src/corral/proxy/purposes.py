"""Embeddings and rerank need a child started for them: refuse (400) before a child is loaded.

llama-server answers such a request with 501 and a llama-server flag ("Start it with
`--embeddings`"); corral's user cannot start it so, but can add the flag to the model's
``args`` in corral's configuration, which the 400 names.
"""

from __future__ import annotations

from corral.config.schema import ModelSpec
from corral.proxy.errors import BadRequestError

EMBEDDING_PATHS = frozenset({"/v1/embeddings", "/embeddings", "/embedding"})
RERANK_PATHS = frozenset({"/v1/rerank", "/v1/reranking", "/rerank", "/reranking"})

_EMBEDDING_FLAGS = frozenset({"--embedding", "--embeddings"})
_RERANK_FLAGS = frozenset({"--rerank", "--reranking"})
_TRUE = frozenset({"1", "true", "on", "yes", "enabled"})


def check_purpose(path: str, spec: ModelSpec) -> None:
    """Raise ``BadRequestError`` if ``path`` needs embeddings or reranking that ``spec``'s
    child is not started with."""
    if path in EMBEDDING_PATHS and not embeddings(spec):
        raise BadRequestError(
            f"model {spec.name!r} serves no embeddings: add --embeddings to its args "
            f"(models.{spec.name}.args) in corral's config", code="embeddings_not_enabled")
    if path in RERANK_PATHS and not reranking(spec):
        raise BadRequestError(
            f"model {spec.name!r} serves no reranking: add --reranking to its args "
            f"(models.{spec.name}.args) in corral's config", code="rerank_not_enabled")


def embeddings(spec: ModelSpec) -> bool:
    """Whether ``spec``'s child serves embeddings (``--embeddings``, or ``--reranking`` which
    implies it), by flag or by llama.cpp's environment variable."""
    return (any(a in _EMBEDDING_FLAGS or a in _RERANK_FLAGS for a in spec.args)
            or _env_on(spec, "LLAMA_ARG_EMBEDDINGS") or _env_on(spec, "LLAMA_ARG_RERANKING"))


def reranking(spec: ModelSpec) -> bool:
    """Whether ``spec``'s child serves reranking: ``--reranking``, or embeddings with rank
    pooling."""
    if any(a in _RERANK_FLAGS for a in spec.args) or _env_on(spec, "LLAMA_ARG_RERANKING"):
        return True
    return embeddings(spec) and _pooling(spec) == "rank"


def _pooling(spec: ModelSpec) -> str | None:
    value = spec.env.get("LLAMA_ARG_POOLING")
    args = spec.args
    for i, arg in enumerate(args):  # the last one wins, as in llama.cpp's parser
        if arg == "--pooling" and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--pooling="):
            value = arg.partition("=")[2]
    return value


def _env_on(spec: ModelSpec, name: str) -> bool:
    return spec.env.get(name, "").strip().lower() in _TRUE
