"""Each tuning setting in the plan, on declared devices: what llama.cpp 515e855 allocates for it
(read from its sources; the CPU-measurable parts are in docs/benchmarks.md), passed to the
child, and taken into account by ``gpu_layers: auto`` and ``slots: auto``."""

from __future__ import annotations

from dataclasses import replace

import pytest

from corral.llamacpp.command import placement_flags
from corral.placement.decide import NoFit, PlacementPlan, PlacementRequest, plan_placement
from corral.placement.devices import gpu, host
from corral.placement.estimate import checkpoint_bytes, estimate_memory, pad
from corral.placement.profile import ModelProfile
from tests.placement.asking import ask
from tests.placement.public_models import (
    GiB,
    gemma3_27b,
    llama31_8b,
    mixtral_8x7b,
)

ONE_24 = [gpu(0, 24 * GiB), host(64 * GiB)]
TWO_24 = [gpu(0, 24 * GiB), gpu(1, 24 * GiB), host(128 * GiB)]


def experts(profile: ModelProfile, il: int) -> int:
    return sum(size for name, size in profile.layer_tensors[il] if "_exps." in name)


def flags(plan: PlacementPlan) -> list[str]:
    return placement_flags(plan)


def _with_draft(request: PlacementRequest, draft: ModelProfile) -> PlacementRequest:
    """The request with its draft model's profile, as ``placement_request`` reads it."""
    return replace(request, draft_profile=draft)


def test_micro_batch_scales_the_compute_buffers() -> None:
    sizes = [plan_placement(llama31_8b(), ask(slots=1, ctx_per_slot=8192, ubatch_size=ub),
                            ONE_24) for ub in (128, 512, 2048)]
    computes = [p.estimate.on("cuda:0").compute for p in sizes]
    assert computes[0] < computes[1] < computes[2]
    # FFN activations 4 x T x 3 x 14336 dominate: 1536 more tokens, that much more at least
    assert computes[2] - computes[1] > 4 * 1536 * 3 * 14336
    assert [flags(p)[flags(p).index("-ub") + 1] for p in sizes] == ["128", "512", "2048"]


def test_a_batch_smaller_than_the_micro_batch_caps_it() -> None:
    plan = plan_placement(llama31_8b(), ask(slots=1, ctx_per_slot=8192, batch_size=256,
                                            ubatch_size=1024), ONE_24)
    assert plan.estimate.n_ubatch == 256 and "-b" in flags(plan)


def test_flash_attention_off_adds_the_attention_scores_on_every_gpu() -> None:
    on = plan_placement(llama31_8b(), ask(slots=1, ctx_per_slot=8192, gpu_layers="all"),
                        [gpu(0, 4 * GiB), gpu(1, 4 * GiB), host(64 * GiB)])
    off = plan_placement(llama31_8b(), ask(slots=1, ctx_per_slot=8192, gpu_layers="all",
                                           flash_attn="off"),
                         [gpu(0, 4 * GiB), gpu(1, 4 * GiB), host(64 * GiB)])
    scores = 8192 * 512 * 32 * 4  # cells x T x heads x f32
    for dev in ("cuda:0", "cuda:1"):
        assert off.estimate.on(dev).compute - on.estimate.on(dev).compute >= scores * 3 // 4
    assert flags(off)[flags(off).index("--flash-attn") + 1] == "off"
    assert "--flash-attn" not in flags(on)  # auto: llama-server's own default


def test_cpu_moe_lets_a_moe_larger_than_the_gpu_run_with_every_layer_on_it() -> None:
    model = mixtral_8x7b()
    assert model.weight_bytes > 24 * GiB
    with pytest.raises(NoFit):
        plan_placement(model, ask(slots=1, ctx_per_slot=4096, gpu_layers="all"), ONE_24)
    plan = plan_placement(model, ask(slots=1, ctx_per_slot=4096, gpu_layers="all",
                                     cpu_moe="all"), ONE_24)
    assert plan.gpu_layers == model.n_layer + 1 and plan.gpus == ("cuda:0",)
    moved = sum(experts(model, il) for il in range(model.n_layer))
    assert plan.estimate.on("cpu").weights == model.token_embd_bytes + moved
    assert plan.estimate.on("cuda:0").weights == model.weight_bytes - plan.estimate.on(
        "cpu").weights
    assert "--cpu-moe" in flags(plan)


def test_n_cpu_moe_moves_the_experts_of_the_first_layers_only() -> None:
    model = mixtral_8x7b()
    whole = plan_placement(model, ask(slots=1, ctx_per_slot=4096, gpu_layers="all",
                                      cpu_moe="all"), ONE_24)
    plan = plan_placement(model, ask(slots=1, ctx_per_slot=4096, gpu_layers="all", cpu_moe=30),
                          ONE_24)
    on_host = whole.estimate.on("cpu").weights - experts(model, 30) - experts(model, 31)
    assert plan.estimate.on("cpu").weights == on_host
    assert flags(plan)[flags(plan).index("--n-cpu-moe") + 1] == "30"


def test_tensor_overrides_move_matching_tensors_and_the_first_match_wins() -> None:
    model = mixtral_8x7b()
    by_pattern = plan_placement(model, ask(slots=1, ctx_per_slot=4096, gpu_layers="all",
                                           tensor_overrides=[r"ffn_.*_exps=CPU"]), ONE_24)
    by_cpu_moe = plan_placement(model, ask(slots=1, ctx_per_slot=4096, gpu_layers="all",
                                           cpu_moe="all"), ONE_24)
    assert by_pattern.reservation == by_cpu_moe.reservation
    # The first pattern keeps layer 0's experts on the GPU; the second sends the rest away.
    first = plan_placement(model, ask(slots=1, ctx_per_slot=4096, gpu_layers="all",
                                      tensor_overrides=[r"blk\.0\.=CUDA0", "_exps=CPU"]),
                           [gpu(0, 26 * GiB), host(64 * GiB)])
    assert first.estimate.on("cpu").weights == by_cpu_moe.estimate.on("cpu").weights - \
        experts(model, 0)
    assert flags(first).count("--override-tensor") == 2


def test_an_override_to_a_second_gpu_puts_the_tensors_there() -> None:
    model = llama31_8b()
    plan = plan_placement(model, ask(slots=1, ctx_per_slot=4096, gpu_layers="all",
                                     tensor_overrides=[r"ffn_down=CUDA1"]), TWO_24)
    downs = sum(size for tensors in model.layer_tensors for name, size in tensors
                if "ffn_down" in name)
    assert len(plan.gpus) == 2
    second = plan.estimate.on(plan.gpus[1])
    on_second = sum(size for il, tensors in enumerate(model.layer_tensors)
                    for name, size in tensors
                    if plan.estimate.layer_devices[il] == plan.gpus[1] or "ffn_down" in name)
    assert second.weights >= on_second - model.output_bytes - model.other_bytes
    assert downs > 0
    with pytest.raises(ValueError, match="needs 2 GPUs, 1 allowed"):
        plan_placement(model, ask(slots=1, ctx_per_slot=4096, gpu_layers="all",
                                  tensor_overrides=["ffn_down=CUDA1"]),
                       [gpu(0, 24 * GiB), host(64 * GiB)], None)


def test_a_draft_model_shows_its_weights_cache_and_compute_on_the_model_gpus() -> None:
    target, draft = llama31_8b(), llama31_8b()
    request = ask(slots=2, ctx_per_slot=4096, draft={"path": "/m/draft.gguf"})
    without = plan_placement(target, ask(slots=2, ctx_per_slot=4096), ONE_24)
    plan = plan_placement(target, _with_draft(request, draft), ONE_24)
    alone = estimate_memory(draft, slots=2, ctx_per_slot=4096, gpu_layers=draft.n_layer + 1,
                            gpu_split=[("cuda:0", 1.0)], gpu_overhead=0, host_overhead=0)
    assert plan.estimate.on("cuda:0").draft == alone.on("cuda:0").total
    assert plan.estimate.on("cpu").draft == alone.on("cpu").total
    assert plan.estimate.on("cuda:0").total == without.estimate.on("cuda:0").total + \
        alone.on("cuda:0").total
    argv = flags(plan)
    assert argv[argv.index("--model-draft") + 1] == "/m/draft.gguf"
    assert argv[argv.index("--gpu-layers-draft") + 1] == "all"


def test_slots_and_gpu_layers_auto_leave_room_for_the_draft() -> None:
    small = [gpu(0, 12 * GiB), host(64 * GiB)]
    request = ask(slots="auto", max_slots=64, ctx_per_slot=8192)
    without = plan_placement(llama31_8b(), request, small)
    drafted = plan_placement(llama31_8b(), _with_draft(
        ask(slots="auto", max_slots=64, ctx_per_slot=8192, draft={"path": "d"}),
        llama31_8b()), small)
    assert drafted.slots < without.slots
    layers = plan_placement(llama31_8b(), _with_draft(
        ask(slots=1, ctx_per_slot=8192, draft={"path": "d", "gpu_layers": 0}), llama31_8b()),
        [gpu(0, 6 * GiB), host(64 * GiB)])
    plain = plan_placement(llama31_8b(), ask(slots=1, ctx_per_slot=8192),
                           [gpu(0, 6 * GiB), host(64 * GiB)])
    # a draft with -ngld 0 lives on the host; op offload copies its layers to the GPU too
    assert layers.gpu_layers <= plain.gpu_layers
    assert layers.estimate.on("cpu").draft > llama31_8b().weight_bytes


def test_a_unified_cache_is_one_cache_each_slot_may_fill() -> None:
    per_slot = plan_placement(llama31_8b(), ask(slots=4, ctx_per_slot=4096), ONE_24)
    unified = plan_placement(llama31_8b(), ask(slots=4, ctx_per_slot=4096, kv_unified=True),
                             ONE_24)
    assert unified.estimate.on("cuda:0").kv_cache == per_slot.estimate.on("cuda:0").kv_cache
    assert unified.estimate.slot_limit == 4 * 4096 and per_slot.estimate.slot_limit == 4096
    assert unified.ctx_total == 4 * 4096 and "--kv-unified" in flags(unified)


def test_a_unified_cache_keeps_one_window_per_slot_for_sliding_layers() -> None:
    gemma = gemma3_27b()  # window 1024: per slot pad(1024 + 512) = 1536 cells
    per_slot = estimate_memory(gemma, slots=4, ctx_per_slot=8192, swa_full=False)
    unified = estimate_memory(gemma, slots=4, ctx_per_slot=8192, kv_unified=True)
    assert per_slot.swa_cells == 1536 and unified.swa_cells == pad(4 * 1024 + 512)
    assert unified.on("cpu").kv_cache < per_slot.on("cpu").kv_cache


def test_kv_offload_off_keeps_the_cache_on_the_host() -> None:
    on = plan_placement(llama31_8b(), ask(slots=2, ctx_per_slot=8192), ONE_24)
    off = plan_placement(llama31_8b(), ask(slots=2, ctx_per_slot=8192, kv_offload=False),
                         ONE_24)
    kv = on.estimate.on("cuda:0").kv_cache
    assert kv == 2 * 8192 * 32 * 2 * 1024 * 2
    assert off.estimate.on("cuda:0").kv_cache == 0 and off.estimate.on("cpu").kv_cache == kv
    assert "--no-kv-offload" in flags(off)


def test_swa_full_gives_sliding_layers_the_whole_context() -> None:
    plain = plan_placement(gemma3_27b(), ask(slots=1, ctx_per_slot=16384), TWO_24)
    full = plan_placement(gemma3_27b(), ask(slots=1, ctx_per_slot=16384, swa_full=True),
                          TWO_24)
    assert plain.estimate.swa_cells == 1536 and full.estimate.swa_cells == 16384
    assert full.estimate.total - plain.estimate.total > 0 and "--swa-full" in flags(full)


def test_checkpoints_and_prompt_cache_add_host_memory() -> None:
    few = plan_placement(gemma3_27b(), ask(slots=2, ctx_per_slot=8192, ctx_checkpoints=1),
                         TWO_24)
    many = plan_placement(gemma3_27b(), ask(slots=2, ctx_per_slot=8192, ctx_checkpoints=5),
                          TWO_24)
    cached = plan_placement(gemma3_27b(), ask(slots=2, ctx_per_slot=8192, ctx_checkpoints=1,
                                              prompt_cache="2GiB"), TWO_24)
    one = many.estimate.on("cpu").overhead - few.estimate.on("cpu").overhead
    assert one > 0 and one % 4 == 0  # four more checkpoints per slot, each a window's cache
    assert cached.estimate.on("cpu").overhead - few.estimate.on("cpu").overhead == 2 * GiB
    argv = flags(cached)
    assert argv[argv.index("--cache-ram") + 1] == "2048"
    assert argv[argv.index("--ctx-checkpoints") + 1] == "1"


def test_an_explicit_tensor_split_is_kept_and_needs_as_many_gpus() -> None:
    plan = plan_placement(llama31_8b(), ask(slots=1, ctx_per_slot=4096, gpu_layers="all",
                                            tensor_split=[3, 1]), TWO_24)
    # 33 layers cut 3:1 as llama.cpp's float split does: layer i < 0.75 x 33 on the first
    assert plan.tensor_split == (25, 8)
    assert flags(plan)[flags(plan).index("--tensor-split") + 1] == "25,8"


def test_split_mode_none_uses_one_gpu_and_row_spreads_the_weights() -> None:
    big = llama31_8b()
    none = plan_placement(big, ask(slots=1, ctx_per_slot=4096, split_mode="none"),
                          [gpu(0, 3 * GiB), gpu(1, 3 * GiB), host(64 * GiB)])
    assert len(none.gpus) == 1 and none.gpu_layers < big.n_layer + 1
    row = plan_placement(big, ask(slots=1, ctx_per_slot=4096, gpu_layers="all",
                                  split_mode="row"),
                         [gpu(0, 4 * GiB), gpu(1, 4 * GiB), host(64 * GiB)])
    first, second = (row.estimate.on(g) for g in row.gpus)
    assert second.weights > 0 and second.kv_cache == 0 and first.kv_cache > 0
    assert flags(row)[flags(row).index("--split-mode") + 1] == "row"


def test_a_checkpoint_saves_the_drafts_sliding_window_too() -> None:
    def host_draft(checkpoints: int) -> int:
        request = ask(slots=1, ctx_per_slot=8192, ctx_checkpoints=checkpoints,
                      draft={"path": "d"})
        plan = plan_placement(gemma3_27b(), _with_draft(request, gemma3_27b()), TWO_24)
        return plan.estimate.on("cpu").draft
    assert host_draft(3) - host_draft(0) == 3 * checkpoint_bytes(gemma3_27b(), 8192)


def test_gpu_layers_auto_offloads_every_layer_once_experts_stay_on_the_host() -> None:
    without = plan_placement(mixtral_8x7b(), ask(slots=1, ctx_per_slot=4096), ONE_24)
    experts_home = plan_placement(mixtral_8x7b(), ask(slots=1, ctx_per_slot=4096,
                                                      cpu_moe="all"), ONE_24)
    assert without.gpu_layers < 33 and experts_home.gpu_layers == 33


def test_cpu_ffn_keeps_the_dense_ffn_of_the_first_layers_on_the_host() -> None:
    model = llama31_8b()
    plain = plan_placement(model, ask(slots=1, ctx_per_slot=4096, gpu_layers="all"), ONE_24)
    moved = plan_placement(model, ask(slots=1, ctx_per_slot=4096, gpu_layers="all",
                                      cpu_ffn=2), ONE_24)
    ffn = sum(size for il in (0, 1) for name, size in model.layer_tensors[il]
              if name.split(".")[2] in ("ffn_up", "ffn_down", "ffn_gate"))
    assert moved.estimate.on("cpu").weights - plain.estimate.on("cpu").weights == ffn > 0
    assert flags(moved)[flags(moved).index("--n-cpu-ffn") + 1] == "2"
