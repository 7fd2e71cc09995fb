"""Memory other programs use: it shrinks a device's budget, and refusals say how much it is.

``corral_usage`` decides what counts as corral's own when the rest of a device's used memory is
charged to other programs: each child's measured use up to its reservation, else its
reservation.
"""

from __future__ import annotations

import pytest

from corral.placement.decide import NoFit, plan_placement
from corral.placement.devices import gpu, host
from corral.placement.ledger import CapacityError, Ledger, corral_usage
from tests.placement.asking import ask
from tests.placement.public_models import GiB, llama31_8b

ONE_24 = [gpu(0, 24 * GiB), host(64 * GiB)]
# Llama-3.1-8B, 4 x 4096, every layer on cuda:0 and nowhere else: about 7 GiB there.
ON_THE_GPU = ask(slots=4, ctx_per_slot=4096, gpu_layers="all",
                              devices=("cuda:0",), name="llama")


def test_external_use_refuses_a_load_that_would_fit_otherwise() -> None:
    lg = Ledger(ONE_24, reserve_gpu=1 * GiB)
    plan = plan_placement(llama31_8b(), ON_THE_GPU, ONE_24, lg)  # 23 GiB budget: fits
    assert plan.gpus == ("cuda:0",)
    lg.set_external("cuda:0", 18 * GiB)  # someone else's training job
    with pytest.raises(NoFit) as caught:
        plan_placement(llama31_8b(), ON_THE_GPU, ONE_24, lg)
    err = caught.value
    (short,) = err.shortfalls
    assert short.device == "cuda:0" and short.external == 18 * GiB
    assert short.capacity == short.free == 5 * GiB  # 24 - 1 reserve - 18 other programs
    # No model of corral's to evict would help, but the other program may end: not permanent,
    # so a load waits for it (bounded), and the 503 says why.
    assert err.impossible and not err.permanent
    assert "5.00 GiB free of 5.00 GiB (other programs use 18.00 GiB)" in str(err)
    assert str(err).endswith("(other programs use the rest: it fits once they free it)")


def test_a_model_larger_than_the_device_is_refused_for_good() -> None:
    lg = Ledger(ONE_24, reserve_gpu=18 * GiB)
    lg.set_external("cuda:0", 3 * GiB)
    with pytest.raises(NoFit) as caught:
        plan_placement(llama31_8b(), ON_THE_GPU, ONE_24, lg)  # about 7 GiB for a 6 GiB budget
    assert caught.value.impossible and caught.value.permanent
    assert str(caught.value).endswith("(more than these devices can hold even when idle)")


def test_refusal_names_holders_and_other_programs_together() -> None:
    lg = Ledger(ONE_24, reserve_gpu=1 * GiB)
    lg.set_external("cuda:0", 3 * GiB)
    lg.reserve("a", {"cuda:0": 15 * GiB})
    with pytest.raises(CapacityError) as caught:
        lg.reserve("b", {"cuda:0": 6 * GiB})
    assert ("cuda:0: needs 6.00 GiB, 5.00 GiB free of 20.00 GiB "
            "(held by a 15.00 GiB; other programs use 3.00 GiB)") in str(caught.value)
    assert {u.device.id: u.as_dict()["external"] for u in lg.snapshot()} == {
        "cuda:0": 3 * GiB, "cpu": 0}


def test_without_external_use_the_message_is_unchanged() -> None:
    lg = Ledger(ONE_24)
    lg.reserve("a", {"cuda:0": 20 * GiB})
    with pytest.raises(CapacityError, match=r"\(held by a 20\.00 GiB\)$"):
        lg.reserve("b", {"cuda:0": 6 * GiB})


def test_corral_usage_counts_each_child_up_to_its_reservation() -> None:
    reserved = {"a": {"cuda:0": 10 * GiB, "cpu": 1 * GiB}, "b": {"cuda:1": 4 * GiB}}
    measured = {
        "a": {"cuda:0": 6 * GiB},  # still loading: 6 of its 10 GiB; nothing measured the host
        "b": {"cuda:1": 5 * GiB},  # 1 GiB more than estimated: that much is charged elsewhere
        "stray": {"cuda:1": 2 * GiB},  # no reservation: the ledger does not cover it
    }
    assert corral_usage(reserved, measured) == {"cuda:0": 6 * GiB, "cpu": 1 * GiB,
                                                "cuda:1": 4 * GiB}


def test_observe_with_corral_usage_charges_only_the_rest_to_other_programs() -> None:
    lg = Ledger(ONE_24, reserve_gpu=1 * GiB)
    lg.reserve("a", {"cuda:0": 10 * GiB})
    # a has allocated 6 of its 10 GiB; other programs use 4: NVML reports 24 - 10 = 14 free.
    used = corral_usage(lg.reservations(), {"a": {"cuda:0": 6 * GiB}})
    lg.observe(gpu(0, 24 * GiB, free=14 * GiB), used["cuda:0"])
    assert lg.external("cuda:0") == 4 * GiB
    assert lg.free("cuda:0") == 24 * GiB - 1 * GiB - 4 * GiB - 10 * GiB
    # Counted with its reservation instead (no measurement), the external use would read 0:
    # the estimate's unallocated part hides other programs.
    lg.observe(gpu(0, 24 * GiB, free=14 * GiB), corral_usage(lg.reservations(), {})["cuda:0"])
    assert lg.external("cuda:0") == 0


def test_a_child_above_its_estimate_still_leaves_the_budget_true() -> None:
    lg = Ledger(ONE_24, reserve_gpu=1 * GiB)
    lg.reserve("a", {"cuda:0": 10 * GiB})
    # a uses 12 GiB, 2 more than it reserved; other programs 4: 24 - 16 = 8 GiB free.
    used = corral_usage(lg.reservations(), {"a": {"cuda:0": 12 * GiB}})
    lg.observe(gpu(0, 24 * GiB, free=8 * GiB), used["cuda:0"])
    assert lg.external("cuda:0") == 6 * GiB  # its excess counts with other programs' 4
    assert lg.free("cuda:0") == 8 * GiB - 1 * GiB  # what is really free, less the reserve
