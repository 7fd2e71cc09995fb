"""``corral plan`` for tuned configurations: a mixture-of-experts model larger than a declared
GPU fits with ``gpu_layers: all`` once its experts stay in host RAM, and a draft model's memory
shows in the plan. Header-only GGUF files: placement reads shapes, never weights."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from corral.config import parse_config
from corral.planreport import build_report, render

GiB = 2**30
Q4, F32 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.F32


@pytest.fixture(scope="module")
def moe_header(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen3-MoE-shaped header: 24 layers of 64 experts (4.1 GiB at Q4_0)."""
    path = tmp_path_factory.mktemp("moe") / "moe.header.gguf"
    n_layer, n_embd, n_ff_exp, n_expert, n_vocab = 24, 2048, 768, 64, 32000
    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    for key, value in (("block_count", n_layer), ("context_length", 32768),
                       ("embedding_length", n_embd), ("feed_forward_length", 6144),
                       ("head_count", 32), ("head_count_kv", 4), ("key_length", 128),
                       ("value_length", 128), ("expert_count", n_expert),
                       ("expert_used_count", 8), ("expert_feed_forward_length", n_ff_exp),
                       ("vocab_size", n_vocab)):
        getattr(writer, f"add_{key}")(value)
    tensors = [("token_embd.weight", (n_vocab, n_embd), Q4),
               ("output.weight", (n_vocab, n_embd), Q4), ("output_norm.weight", (n_embd,), F32)]
    for i in range(n_layer):
        tensors += [(f"blk.{i}.attn_q.weight", (4096, n_embd), Q4),
                    (f"blk.{i}.attn_k.weight", (512, n_embd), Q4),
                    (f"blk.{i}.attn_v.weight", (512, n_embd), Q4),
                    (f"blk.{i}.attn_output.weight", (n_embd, 4096), Q4),
                    (f"blk.{i}.ffn_gate_inp.weight", (n_expert, n_embd), F32),
                    (f"blk.{i}.ffn_gate_exps.weight", (n_expert, n_ff_exp, n_embd), Q4),
                    (f"blk.{i}.ffn_up_exps.weight", (n_expert, n_ff_exp, n_embd), Q4),
                    (f"blk.{i}.ffn_down_exps.weight", (n_expert, n_embd, n_ff_exp), Q4)]
    for name, shape, qtype in tensors:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        writer.add_tensor_info(name, shape, np.dtype(np.float32),
                               math.prod(shape) // block * type_size, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def plan(models: dict[str, Any], gpu: str = "3GiB") -> dict[str, Any]:
    config = parse_config({"devices": [{"id": "cuda:0", "memory": gpu},
                                       {"id": "cpu", "memory": "64GiB"}],
                           "models": models})
    report = build_report(config)
    return {"json": report.as_dict()["models"], "text": render(report)}


def test_a_moe_larger_than_the_gpu_fits_with_all_layers_once_experts_stay_on_the_host(
    moe_header: Path,
) -> None:
    model = {"path": str(moe_header), "slots": 2, "ctx_per_slot": 4096, "gpu_layers": "all"}
    before = plan({"moe": model})["json"][0]
    assert not before["resident"] and "cuda:0" in before["error"]
    after = plan({"moe": {**model, "args": ["--cpu-moe"]}})
    (planned,) = after["json"]
    assert planned["resident"] and planned["devices"] == ["cuda:0"]
    assert planned["gpu_layers"] == planned["layers"] == 25  # every layer and the output
    assert planned["memory"]["cpu"]["weights"] > 3.5 * GiB  # the experts
    assert planned["memory"]["cuda:0"]["weights"] < 1 * GiB
    assert "--cpu-moe" in planned["command"] and "tuning: cpu_moe all" in after["text"]


def test_a_draft_models_memory_shows_in_the_plan(smollm2_header: Path) -> None:
    model = {"path": str(smollm2_header), "slots": 2, "ctx_per_slot": 1024}
    plain = plan({"m": model})["json"][0]
    drafted = plan({"m": {**model, "draft": {"path": str(smollm2_header)}}})
    (planned,) = drafted["json"]
    # SmolLM2 drafting for itself: the draft costs what the model does, less the process.
    for dev in ("cpu", "cuda:0"):
        mine, draft = planned["memory"][dev], planned["memory"][dev]["draft"]
        assert draft > 0 and mine["total"] == plain["memory"][dev]["total"] + draft
    assert "draft model" in drafted["text"]
    argv = planned["command"]
    assert argv[argv.index("--model-draft") + 1] == str(smollm2_header)
