"""Models in Ollama's local store, read in place through its manifests: the model layer's
GGUF blob and, for vision models, its projector blob. Nothing is copied.

The store is ``$OLLAMA_MODELS``, else ``~/.ollama/models``, else the Linux service's
``/usr/share/ollama/.ollama/models``: ``manifests/HOST/NAMESPACE/MODEL/TAG`` (JSON with
``layers``, each a media type and a ``sha256:HEX`` digest) and ``blobs/sha256-HEX``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from corral.config.sources import OllamaSource
from corral.errors import DownloadError

MODEL_LAYER = "application/vnd.ollama.image.model"
PROJECTOR_LAYER = "application/vnd.ollama.image.projector"
_REGISTRY = "registry.ollama.ai"
_SERVICE_STORE = Path("/usr/share/ollama/.ollama/models")


@dataclass(frozen=True)
class Blob:
    path: Path
    sha256: str
    size: int


def store_dir() -> Path:
    """Ollama's model directory on this host."""
    given = os.environ.get("OLLAMA_MODELS")
    if given:
        return Path(os.path.expanduser(given))
    home = Path(os.path.expanduser("~/.ollama/models"))
    if not home.is_dir() and _SERVICE_STORE.is_dir():
        return _SERVICE_STORE
    return home


def manifest_path(store: Path, name: str) -> Path:
    """Where the manifest of ``name`` (``llama3.2:3b``, ``user/model``, ``host/ns/model:tag``)
    lies in ``store``."""
    base, _, tag = name.partition(":")
    parts = base.split("/")
    if len(parts) == 1:
        parts = [_REGISTRY, "library", *parts]
    elif len(parts) == 2:
        parts = [_REGISTRY, *parts]
    return store.joinpath("manifests", *parts, tag or "latest")


def find_model(source: OllamaSource) -> tuple[Blob, Blob | None]:
    """The model blob and the projector blob (None if it has none) of ``source``;
    DownloadError naming the manifest looked for when the model is not in the store."""
    store = store_dir()
    path = manifest_path(store, source.name)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DownloadError(source.ref, f"not in Ollama's store (no manifest {path}; "
                            f"`ollama pull {source.name}`, or set OLLAMA_MODELS)",
                            retry_after=60.0) from None
    except (OSError, ValueError) as exc:
        raise DownloadError(source.ref, f"cannot read the manifest {path}: {exc}") from None
    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    blobs: dict[str, Blob] = {}
    for layer in layers if isinstance(layers, list) else ():
        if not isinstance(layer, dict) or layer.get("mediaType") not in (MODEL_LAYER,
                                                                         PROJECTOR_LAYER):
            continue
        digest = str(layer.get("digest", ""))
        hex_ = digest.removeprefix("sha256:")
        blob = Blob(store / "blobs" / f"sha256-{hex_}", hex_, int(layer.get("size") or 0))
        if not blob.path.is_file():
            raise DownloadError(source.ref, f"the manifest {path} names blob {digest}, which "
                                "is not in the store", retry_after=60.0)
        blobs.setdefault(str(layer["mediaType"]), blob)
    if MODEL_LAYER not in blobs:
        raise DownloadError(source.ref, f"the manifest {path} has no model layer (not a GGUF "
                            "model?)", retry_after=60.0)
    return blobs[MODEL_LAYER], blobs.get(PROJECTOR_LAYER)
