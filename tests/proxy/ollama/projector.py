"""A tiny multimodal projector (LLaVA's ``mlp`` type) that the real llama-server loads beside
SmolLM2, so the Ollama API's ``images`` can be shown end to end without a vision model.

Random weights: a one-block vision tower (32x32 pixels, 16-pixel patches: 4 image tokens) and
an MLP into SmolLM2's 576-wide embeddings. It reads nothing in an image; it only makes
llama-server accept one. Under 2 MB, written in well under a second.
"""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

import gguf
import numpy as np

WIDTH = 64  # the vision tower's embedding
TEXT = 576  # SmolLM2's n_embd: what the projector must produce
IMAGE, PATCH = 32, 16


def write_projector(path: Path) -> Path:
    """Write the projector GGUF to ``path``."""
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.use_gelu", True)
    for key, value in (("image_size", IMAGE), ("patch_size", PATCH),
                       ("embedding_length", WIDTH), ("feed_forward_length", 2 * WIDTH),
                       ("block_count", 1), ("attention.head_count", 4),
                       ("projection_dim", TEXT)):
        writer.add_uint32(f"clip.vision.{key}", value)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int) -> None:  # numpy order: llama.cpp's ne reversed
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    tensor("v.patch_embd.weight", WIDTH, 3, PATCH, PATCH)
    tensor("v.position_embd.weight", (IMAGE // PATCH) ** 2, WIDTH)
    for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
        tensor(f"v.blk.0.{name}.weight", WIDTH, WIDTH)
        tensor(f"v.blk.0.{name}.bias", WIDTH)
    for name in ("ln1", "ln2"):
        writer.add_tensor(f"v.blk.0.{name}.weight", np.ones(WIDTH, np.float32))
        tensor(f"v.blk.0.{name}.bias", WIDTH)
    tensor("v.blk.0.ffn_up.weight", 2 * WIDTH, WIDTH)
    tensor("v.blk.0.ffn_up.bias", 2 * WIDTH)
    tensor("v.blk.0.ffn_down.weight", WIDTH, 2 * WIDTH)
    tensor("v.blk.0.ffn_down.bias", WIDTH)
    tensor("mm.0.weight", TEXT, WIDTH)
    tensor("mm.0.bias", TEXT)
    tensor("mm.2.weight", TEXT, TEXT)
    tensor("mm.2.bias", TEXT)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def red_square() -> str:
    """A 32x32 red PNG, base64 (as Ollama's clients send images)."""
    rows = b"".join(b"\x00" + bytes([200, 30, 30]) * IMAGE for _ in range(IMAGE))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", IMAGE, IMAGE, 8, 2, 0, 0, 0)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
           + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()
