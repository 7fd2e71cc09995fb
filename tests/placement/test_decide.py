"""Planner decisions for public models on declared devices, with the arithmetic behind each.

Sizes come from ``public_models`` (Q4_K_M-like, 4.85 bits per block weight). Per-model numbers
used below (MiB): one block / token embeddings / output projection / KV per token (f16)

- Llama-3.1-8B:   126.1 / 281.8 / 411.0 / 0.125 (32 layers x 2 x 1024 x 2 bytes)
- Llama-3.1-70B:  494.8 / 563.6 / 822.0 / 0.3125
- Qwen2.5-32B:    282.0 / 417.7 / 609.1 / 0.25
- Mixtral-8x7B:   839.2 /  70.3 / 102.5 / 0.125
- Gemma-3-27B:    238.8 / 756.2 / tied  / 8 KiB per layer and token

Every GPU also carries 512 MiB of overhead (CUDA context, cuBLAS, pool) and a compute buffer of
a few hundred MiB; the host carries the token embeddings, the logits and 64 MiB of process.
"""

from __future__ import annotations

import pytest

from corral.llamacpp.command import placement_flags, planned_env
from corral.placement.decide import (
    NoFit,
    PlacementPlan,
    choose_evictions,
    plan_placement,
)
from corral.placement.devices import Device, gpu, host
from corral.placement.estimate import estimate_memory
from corral.placement.ledger import EvictionCandidate, Ledger
from corral.placement.profile import ModelProfile
from tests.placement.asking import ask
from tests.placement.public_models import (
    GiB,
    MiB,
    gemma3_27b,
    llama31_8b,
    llama31_70b,
    mixtral_8x7b,
    qwen25_32b,
)

ONE_24 = [gpu(0, 24 * GiB, uuid="GPU-aaaa"), host(64 * GiB)]
TWO_24 = [gpu(0, 24 * GiB), gpu(1, 24 * GiB), host(128 * GiB)]
EIGHT_80 = [gpu(i, 80 * GiB) for i in range(8)] + [host(1024 * GiB)]
CPU_64 = [host(64 * GiB)]


def fits(profile: ModelProfile, plan: PlacementPlan, devices: list[Device], **change: int) -> bool:
    """Whether the plan, with one setting changed, would still fit the empty devices."""
    settings = {"slots": plan.slots, "ctx_per_slot": plan.ctx_per_slot,
                "gpu_layers": plan.gpu_layers}
    settings.update(change)
    split = [(g, float(n)) for g, n in zip(plan.gpus, plan.tensor_split or (1,), strict=True)]
    est = estimate_memory(profile, gpu_split=split or None, **settings)
    return Ledger(devices).fits(est.reservation())


def arg(plan: PlacementPlan, flag: str) -> str:
    flags = placement_flags(plan)
    return flags[flags.index(flag) + 1]


def test_llama8b_on_one_24gib_gpu() -> None:
    plan = plan_placement(llama31_8b(), ask(slots=4, ctx_per_slot=8192), ONE_24)
    # GPU: 32 x 126.1 + 411.0 output = 4447 MiB weights, 4 x 8192 x 0.125 = 4096 MiB KV,
    # ~132 MiB compute, 512 MiB overhead: 9187 MiB, far below 24 GiB -> every layer offloaded
    assert plan.gpus == ("cuda:0",) and plan.gpu_layers == 33  # 32 blocks + the output layer
    assert 9150 * MiB < plan.reservation["cuda:0"] < 9200 * MiB
    # host: 281.8 embeddings + 2 MiB logits (4 x 128256 x 4) + compute + 64 MiB process
    assert 350 * MiB < plan.reservation["cpu"] < 380 * MiB
    assert placement_flags(plan)[:6] == ["-np", "4", "-c", "32768", "-ngl", "33"]
    assert arg(plan, "--fit") == "off" and arg(plan, "--cache-type-k") == "f16"
    assert arg(plan, "--cache-ram") == "0" and "--tensor-split" not in placement_flags(plan)
    # by UUID: immune to CUDA's ordering
    assert planned_env(plan)["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa"


def test_llama70b_splits_over_two_24gib_gpus_with_auto_slots() -> None:
    profile = llama31_70b()
    plan = plan_placement(profile, ask(slots="auto", ctx_per_slot=4096), TWO_24)
    # 80 x 494.8 + 822 = 40403 MiB of weights: no single 24 GiB GPU holds it, two do.
    # Left for KV: 49152 - 40403 - 2 x 512 overhead - 2 x ~312 compute ~= 7100 MiB;
    # a slot of 4096 tokens needs 4096 x 0.3125 = 1280 MiB -> 5 slots (6 would need 7680)
    assert plan.gpus == ("cuda:0", "cuda:1") and plan.gpu_layers == 81
    assert plan.slots == 5 and not fits(profile, plan, TWO_24, slots=6)
    # equal free memory -> 81 layers cut 41 / 40 (the output layer is the second GPU's last)
    assert plan.tensor_split == (41, 40)
    assert arg(plan, "--tensor-split") == "41,40" and arg(plan, "--split-mode") == "layer"
    assert planned_env(plan)["CUDA_VISIBLE_DEVICES"] == "0,1"
    for device in ("cuda:0", "cuda:1"):
        assert plan.reservation[device] <= 24 * GiB


def test_more_slots_than_fit_fully_offloaded_means_fewer_gpu_layers() -> None:
    plan = plan_placement(llama31_70b(), ask(slots=6, ctx_per_slot=4096), TWO_24)
    # 6 slots do not fit with all 81 layers on the GPUs (above); auto gpu_layers keeps as many
    # as fit and leaves the first blocks on the CPU
    assert 70 < plan.gpu_layers < 81
    assert plan.estimate.on("cpu").weights > 563 * MiB


def test_llama70b_on_one_24gib_gpu() -> None:
    profile = llama31_70b()
    with pytest.raises(NoFit) as caught:
        plan_placement(profile, ask(slots=1, ctx_per_slot=4096, gpu_layers="all"),
                       ONE_24)
    assert caught.value.impossible  # 40 GiB of weights never fit a 24 GiB GPU, idle or not
    (short,) = caught.value.shortfalls
    assert short.device == "cuda:0" and short.needed > 39 * GiB and short.free == 24 * GiB

    plan = plan_placement(profile, ask(slots=1, ctx_per_slot=4096), ONE_24)
    # auto: each GPU block costs 494.8 MiB + 16 MiB KV (4096 x 2 x 1024 x 2 bytes); after the
    # output (822), overhead (512) and compute (~747, including room for one CPU block's
    # weights that large batches run on the GPU) ~22500 MiB remain -> 44 blocks + output
    assert plan.gpu_layers == 45
    assert not fits(profile, plan, ONE_24, gpu_layers=46)
    assert plan.estimate.layer_devices[:36] == ("cpu",) * 36  # blocks 0..35 stay on the host


def test_qwen32b_auto_context_is_the_largest_that_fits() -> None:
    profile = qwen25_32b()
    plan = plan_placement(profile, ask(slots=1, ctx_per_slot="auto"), ONE_24)
    # 24576 - 18655 weights - 512 overhead - ~232 compute = ~5177 MiB for KV at 0.25 MiB a
    # token -> 20708 tokens -> 20480, the largest multiple of 256 below
    assert plan.ctx_per_slot == 20480 and plan.gpu_layers == 65
    assert not fits(profile, plan, ONE_24, ctx_per_slot=20480 + 256)


def test_auto_context_is_capped_by_the_trained_context() -> None:
    plan = plan_placement(qwen25_32b(), ask(slots=1, ctx_per_slot="auto"),
                          EIGHT_80)
    assert plan.ctx_per_slot == 32768  # Qwen2.5 was trained on 32768 tokens


def test_both_auto_fills_slots_at_the_minimum_context_first() -> None:
    plan = plan_placement(qwen25_32b(), ask(slots="auto", ctx_per_slot="auto"),
                          ONE_24)
    # ~5177 MiB of KV at 2048 x 0.25 = 512 MiB a slot -> 10 slots, nothing left to grow ctx
    assert (plan.slots, plan.ctx_per_slot) == (10, 2048)


def test_mixtral_partial_on_one_gpu_full_on_two() -> None:
    profile = mixtral_8x7b()
    request = ask(slots=2, ctx_per_slot=4096)
    one = plan_placement(profile, request, ONE_24)
    # 32 x 839.2 = 26854 MiB of experts and attention > 24 GiB. Per GPU block: 839.2 weights
    # + 32 MiB KV (2 x 4096 x 2 x 1024 x 2 bytes); after overhead 512, output 102.5 and
    # compute ~1051 (839 of it one CPU block's weights) ~22900 MiB -> 26 blocks + output
    assert one.gpu_layers == 27 and one.gpus == ("cuda:0",)
    assert not fits(profile, one, ONE_24, gpu_layers=28)
    two = plan_placement(profile, request, TWO_24)
    assert two.gpu_layers == 33 and two.tensor_split == (17, 16)


def test_gemma3_sliding_window_keeps_kv_small() -> None:
    profile = gemma3_27b()
    plan = plan_placement(profile, ask(slots=1, ctx_per_slot=32768), ONE_24)
    # 10 global layers x 32768 x 8 KiB = 2560 MiB, 52 sliding layers x pad256(1024 + 512) =
    # 1536 cells x 8 KiB = 624 MiB: 3184 MiB instead of 62 x 32768 x 8 KiB = 15872 MiB
    assert plan.estimate.on("cuda:0").kv_cache == 3184 * MiB
    assert plan.gpu_layers == 63
    # llama-server keeps context checkpoints of the sliding layers in host memory: each the
    # window's 1024 cells x 52 layers x 8 KiB = 416 MiB, and 12 bytes a cell of positions
    assert arg(plan, "--ctx-checkpoints") == "2"
    assert plan.estimate.on("cpu").overhead == 64 * MiB + 2 * (416 * MiB + 12 * 1024)
    slots = plan_placement(profile, ask(slots="auto", ctx_per_slot=8192), ONE_24)
    # a slot of 8192: 10 x 8192 x 8 KiB + 624 = 1264 MiB; 24576 - 15559 - 512 - ~190 compute
    # leaves ~8300 MiB -> 6 slots
    assert slots.slots == 6


def occupied_eight() -> Ledger:
    lg = Ledger(EIGHT_80)
    lg.reserve("x", {"cuda:2": 60 * GiB})  # 20 GiB free
    lg.reserve("y", {"cuda:5": 30 * GiB})  # 50 GiB free
    lg.reserve("z", {"cuda:6": 20 * GiB})  # 60 GiB free
    return lg


def test_binpack_takes_the_fullest_gpu_that_fits_spread_the_emptiest() -> None:
    request = ask(slots=4, ctx_per_slot=8192)
    # 70B with 4 x 8192: 40403 + 4 x 8192 x 0.3125 = 10240 KV + ~770 = 51411 MiB (50.2 GiB):
    # cuda:2 (20 GiB free) and cuda:5 (50 GiB) are too small, cuda:6 (60 GiB) is the tightest
    binpack = plan_placement(llama31_70b(), request, EIGHT_80, occupied_eight())
    assert binpack.gpus == ("cuda:6",)
    spread = plan_placement(llama31_70b(), ask(
        slots=4, ctx_per_slot=8192, placement="spread"), EIGHT_80, occupied_eight())
    assert spread.gpus == ("cuda:0",)  # an idle 80 GiB GPU (the first of the idle ones)
    # 8B (9187 MiB) fits the 20 GiB left on cuda:2
    assert plan_placement(llama31_8b(), request, EIGHT_80, occupied_eight()).gpus == ("cuda:2",)


def test_pinned_devices() -> None:
    lg = occupied_eight()
    plan = plan_placement(llama31_8b(), ask(devices=("cuda:3",)), EIGHT_80, lg)
    assert plan.gpus == ("cuda:3",)
    request = ask(slots=4, ctx_per_slot=8192, devices=("cuda:2",))
    with pytest.raises(NoFit) as caught:
        plan_placement(llama31_70b(), request, EIGHT_80, lg)
    # only cuda:2, and no CPU layers allowed: 50.2 GiB needed, 20 free, "x" holds 60
    err = caught.value
    assert not err.impossible and err.shortfalls[0].holders == {"x": 60 * GiB}
    assert "cuda:2: needs 50.21 GiB, 20.00 GiB free of 80.00 GiB (held by x 60.00 GiB)" in str(err)
    victims = choose_evictions(err.needed, [EvictionCandidate("x", 1.0),
                                            EvictionCandidate("y", 0.0)], lg)
    assert victims == ["x"]  # "y" is older but holds nothing on cuda:2
    lg.release("x")
    assert plan_placement(llama31_70b(), request, EIGHT_80, lg).gpus == ("cuda:2",)
    with pytest.raises(ValueError, match="not pinned"):
        plan_placement(llama31_8b(), ask(gpu_layers=10, devices=("cuda:0",)),
                       EIGHT_80)


def test_cpu_only_host() -> None:
    plan = plan_placement(llama31_8b(), ask(slots="auto", ctx_per_slot=8192,
                                                         max_slots=64), CPU_64)
    # 65536 - 4729 weights - 64 process - ~131 compute - ~30 logits = ~60580 MiB of KV at
    # 1024 MiB a slot -> 59 slots
    assert plan.slots == 59 and plan.gpu_layers == 0 and plan.gpus == ()
    assert arg(plan, "-ngl") == "0"
    assert planned_env(plan)["CUDA_VISIBLE_DEVICES"] == ""  # hide GPUs: no CUDA context, no offload
    big = plan_placement(llama31_70b(), ask(slots=1, ctx_per_slot=4096), CPU_64)
    assert 41 * GiB < big.reservation["cpu"] < 42 * GiB


def test_explicit_gpu_layers() -> None:
    plan = plan_placement(llama31_8b(), ask(gpu_layers=20), ONE_24)
    # -ngl 20: the output layer and blocks 13..31 on the GPU, blocks 0..12 on the host
    assert plan.gpu_layers == 20
    assert plan.estimate.layer_devices.count("cpu") == 13
    assert plan_placement(llama31_8b(), ask(gpu_layers=0), ONE_24).gpus == ()


def test_the_ledger_refuses_a_second_copy_of_the_same_free_bytes() -> None:
    lg = Ledger(ONE_24)
    request = ask(slots=4, ctx_per_slot=16384)
    first = plan_placement(qwen25_32b(), ask(slots=1, ctx_per_slot=4096),
                           ONE_24, lg)
    lg.reserve("qwen", first.reservation)
    # 19.7 GiB held, 4.3 left: another 8B with 4 x 16384 (8 GiB KV) does not fit on the GPU,
    # so auto offloads what fits and leaves the rest on the host
    second = plan_placement(llama31_8b(), request, ONE_24, lg)
    assert second.gpu_layers < 33
    lg.reserve("llama", second.reservation)
    assert lg.free("cuda:0") >= 0


def test_flash_attention_off_is_passed_and_estimated() -> None:
    on = plan_placement(llama31_8b(), ask(slots=1, ctx_per_slot=8192), ONE_24)
    off = plan_placement(llama31_8b(), ask(slots=1, ctx_per_slot=8192,
                                                        flash_attn="off"), ONE_24)
    assert "--flash-attn" not in placement_flags(on) and arg(off, "--flash-attn") == "off"
    # attention scores 8192 x 512 x 32 heads x 4 bytes = 512 MiB now sit in the compute buffer,
    # where flash attention needed ~132 MiB in all
    assert on.estimate.on("cuda:0").compute < 140 * MiB
    assert off.estimate.on("cuda:0").compute > 512 * MiB


def test_uneven_gpus_get_layers_in_proportion_to_free_memory() -> None:
    devices = [gpu(0, 24 * GiB), gpu(1, 48 * GiB), host(128 * GiB)]
    plan = plan_placement(llama31_70b(), ask(slots=1, ctx_per_slot=4096), devices)
    # 40 GiB of weights: too big for cuda:0 alone, fits cuda:1 alone (binpack: the only one)
    assert plan.gpus == ("cuda:1",)
    spread = [gpu(0, 24 * GiB), gpu(1, 36 * GiB), host(128 * GiB)]
    plan = plan_placement(llama31_70b(), ask(slots=1, ctx_per_slot=4096), spread)
    # neither alone; together, split by free memory 24 : 36 -> about 2 : 3 of 81 layers
    assert plan.gpus == ("cuda:1", "cuda:0")  # most free first
    assert sum(plan.tensor_split) == 81 and plan.tensor_split[0] > plan.tensor_split[1]
    for device, size in (("cuda:0", 24 * GiB), ("cuda:1", 36 * GiB)):
        assert plan.reservation[device] <= size


def test_request_mistakes() -> None:
    with pytest.raises(ValueError, match=r"models\.big\.devices: pinned devices not found: "
                       r"cuda:9 \(this host has cpu, cuda:0\)"):
        plan_placement(llama31_8b(), ask(devices=("cuda:9",), name="big"), ONE_24)
    with pytest.raises(ValueError, match="host"):
        plan_placement(llama31_8b(), ask(), [gpu(0, 24 * GiB)])
    with pytest.raises(ValueError, match="multiple of 256"):
        ask(ctx_per_slot=1000)
    with pytest.raises(ValueError, match="slots"):
        ask(slots=0)
