"""Hypothesis strategies for placement: random devices, model profiles and requests.

Sizes are drawn in whole MiB or GiB so that shrunk examples read easily; models range from a
few MiB to more than the smaller devices hold, so that fitting, eviction and refusal all happen.
"""

from __future__ import annotations

from hypothesis import strategies as st

from corral.config.schema import ModelSettings
from corral.placement.decide import PlacementRequest
from corral.placement.devices import Device, gpu, host
from corral.placement.profile import ModelProfile, profile_from_fields

MiB = 1 << 20
GiB = 1 << 30


@st.composite
def device_sets(draw: st.DrawFn, max_gpus: int = 3) -> list[Device]:
    """0 to ``max_gpus`` GPUs of 2 to 24 GiB, and the host's RAM of 2 to 16 GiB."""
    n_gpus = draw(st.integers(min_value=0, max_value=max_gpus))
    found = [gpu(i, draw(st.integers(min_value=2, max_value=24)) * GiB) for i in range(n_gpus)]
    return [*found, host(draw(st.integers(min_value=2, max_value=16)) * GiB)]


@st.composite
def profiles(draw: st.DrawFn) -> ModelProfile:
    """A llama-like model: 1 to 16 blocks of 1 to 768 MiB each, embeddings, maybe an output.

    From a few MiB to 12 GiB of weights: a few fit a device together, some never fit.
    """
    n_layer = draw(st.integers(min_value=1, max_value=16))
    n_head_kv = draw(st.sampled_from([1, 2, 4, 8]))
    n_head = n_head_kv * draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([64, 128]))
    n_embd = n_head * head_dim
    block = st.integers(min_value=1, max_value=768).map(lambda n: n * MiB)
    fields: dict[str, object] = {
        "general.architecture": "llama",
        "llama.block_count": n_layer,
        "llama.embedding_length": n_embd,
        "llama.feed_forward_length": 4 * n_embd,
        "llama.attention.head_count": n_head,
        "llama.attention.head_count_kv": n_head_kv,
        "llama.context_length": draw(st.sampled_from([2048, 8192, 32768])),
        "llama.vocab_size": draw(st.sampled_from([32000, 128256])),
    }
    tensors = [("token_embd.weight", draw(block)), ("output_norm.weight", 4 * n_embd)]
    if draw(st.booleans()):
        tensors.append(("output.weight", draw(block)))
    sizes = draw(st.lists(block, min_size=n_layer, max_size=n_layer))
    tensors += [(f"blk.{i}.ffn_up.weight", size) for i, size in enumerate(sizes)]
    return profile_from_fields(fields, tensors)


def requests(name: str) -> st.SearchStrategy[PlacementRequest]:
    """What a model may ask for, any device (pinning is covered by the planner's own tests)."""
    settings = st.builds(
        ModelSettings,
        slots=st.sampled_from([1, 2, 4, "auto"]),
        ctx_per_slot=st.sampled_from([512, 4096, "auto"]),
        gpu_layers=st.sampled_from(["auto", "all", 0, 4]),
        max_slots=st.just(4),
    )
    return st.builds(
        PlacementRequest,
        settings=settings,
        placement=st.sampled_from(["binpack", "spread"]),
        name=st.just(name),
    )
