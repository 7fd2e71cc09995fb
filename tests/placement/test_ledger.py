"""The ledger never over-commits a device, and evictions follow the documented rule."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.errors import CorralError
from corral.placement.decide import EvictionCandidate, choose_evictions
from corral.placement.devices import gpu, host
from corral.placement.ledger import CapacityError, Ledger

GiB = 1 << 30


def ledger() -> Ledger:
    return Ledger([gpu(0, 24 * GiB), gpu(1, 24 * GiB), host(64 * GiB)],
                  reserve_gpu=1 * GiB, reserve_ram=4 * GiB)


def test_budget_is_total_minus_reserve_minus_external() -> None:
    lg = ledger()
    assert lg.capacity("cuda:0") == 23 * GiB
    assert lg.capacity("cpu") == 60 * GiB
    lg.set_external("cuda:0", 3 * GiB)  # another user's process
    assert lg.free("cuda:0") == 20 * GiB


def test_reserve_release_and_views() -> None:
    lg = ledger()
    lg.reserve("a", {"cuda:0": 10 * GiB, "cpu": 1 * GiB})
    lg.reserve("b", {"cuda:0": 5 * GiB})
    assert lg.free("cuda:0") == 8 * GiB
    assert lg.held_by("cuda:0") == {"a": 10 * GiB, "b": 5 * GiB}
    assert lg.holdings("a") == {"cuda:0": 10 * GiB, "cpu": 1 * GiB}
    assert lg.free("cuda:0", ignoring=["a"]) == 18 * GiB
    usage = {u.device.id: u for u in lg.snapshot()}
    assert usage["cuda:0"].held == 15 * GiB and usage["cuda:0"].free == 8 * GiB
    assert lg.release("a") == {"cuda:0": 10 * GiB, "cpu": 1 * GiB}
    assert lg.release("a") == {}
    assert lg.free("cuda:0") == 18 * GiB


def test_refusal_is_atomic_and_explains_itself() -> None:
    lg = ledger()
    lg.reserve("big", {"cuda:1": 20 * GiB})
    with pytest.raises(CapacityError) as caught:
        lg.reserve("new", {"cuda:0": 2 * GiB, "cuda:1": 4 * GiB})
    err = caught.value
    assert isinstance(err, CorralError)
    assert lg.holdings("new") == {}  # cuda:0 was not taken either
    (short,) = err.shortfalls
    assert (short.device, short.needed, short.free) == ("cuda:1", 4 * GiB, 3 * GiB)
    assert short.holders == {"big": 20 * GiB} and short.missing == 1 * GiB
    assert "cuda:1: needs 4.00 GiB, 3.00 GiB free of 23.00 GiB (held by big 20.00 GiB)" in str(err)


def test_reserving_again_replaces() -> None:
    lg = ledger()
    lg.reserve("a", {"cuda:0": 20 * GiB})
    lg.reserve("a", {"cuda:0": 22 * GiB})  # would not fit beside the old 20, fits instead of it
    assert lg.holdings("a") == {"cuda:0": 22 * GiB}


def test_unknown_device_and_negative_amounts_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown device"):
        ledger().reserve("a", {"cuda:7": 1})
    with pytest.raises(ValueError, match=">= 0"):
        ledger().reserve("a", {"cuda:0": -1})


def test_concurrent_reservations_never_share_free_bytes() -> None:
    lg = ledger()
    won: list[str] = []

    def load(name: str) -> None:
        try:
            lg.reserve(name, {"cuda:0": 15 * GiB})
            won.append(name)
        except CapacityError:
            pass

    threads = [threading.Thread(target=load, args=(f"m{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1  # 23 GiB budget holds one 15 GiB model, never two


operations = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "release"]),
        st.sampled_from(["a", "b", "c", "d"]),
        st.dictionaries(st.sampled_from(["cuda:0", "cuda:1", "cpu"]),
                        st.integers(min_value=0, max_value=40 * GiB), max_size=3),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(operations, st.integers(min_value=0, max_value=8 * GiB))
def test_property_never_over_commits(ops: list[tuple[str, str, dict[str, int]]],
                                     external: int) -> None:
    lg = ledger()
    lg.set_external("cuda:1", external)
    for op, owner, amounts in ops:
        before = {o: lg.holdings(o) for o in lg.owners}
        if op == "release":
            lg.release(owner)
        else:
            try:
                lg.reserve(owner, amounts)
            except CapacityError:
                # refused: nothing changed
                assert {o: lg.holdings(o) for o in lg.owners} == before
        for device in ("cuda:0", "cuda:1", "cpu"):
            held = sum(lg.held_by(device).values())
            assert held <= lg.capacity(device)
            assert lg.free(device) >= 0


# Evictions ---------------------------------------------------------------------------------


def candidates() -> list[EvictionCandidate]:
    return [
        EvictionCandidate("old", last_used=100.0, held={"cuda:0": 6 * GiB}),
        EvictionCandidate("older", last_used=50.0, held={"cuda:0": 6 * GiB}),
        EvictionCandidate("recent", last_used=300.0, held={"cuda:0": 10 * GiB}),
    ]


def full_ledger() -> Ledger:
    lg = ledger()
    for c in candidates():
        lg.reserve(c.name, dict(c.held))
    return lg  # cuda:0: 23 - 22 = 1 GiB free


def test_nothing_to_evict_when_it_fits() -> None:
    assert choose_evictions({"cuda:0": 1 * GiB}, candidates(), full_ledger()) == []


def test_least_recently_used_first() -> None:
    # 5 GiB more needed: either 6 GiB model frees enough; the one used longest ago goes
    assert choose_evictions({"cuda:0": 6 * GiB}, candidates(), full_ledger()) == ["older"]


def test_fewest_models_beats_pure_lru() -> None:
    # 9 GiB more needed: "recent" alone (10 GiB) beats "older" + "old" (two models)
    assert choose_evictions({"cuda:0": 10 * GiB}, candidates(), full_ledger()) == ["recent"]


def test_two_models_when_one_is_not_enough() -> None:
    # 15 GiB more: any pair with "recent" works; pick the pair whose newest member is oldest
    assert choose_evictions({"cuda:0": 16 * GiB}, candidates(), full_ledger()) == [
        "older", "recent"]


def test_pinned_and_busy_are_never_evicted() -> None:
    cands = candidates()
    cands[1] = EvictionCandidate("older", 50.0, {"cuda:0": 6 * GiB}, pinned=True)
    cands[0] = EvictionCandidate("old", 100.0, {"cuda:0": 6 * GiB}, busy=True)
    assert choose_evictions({"cuda:0": 6 * GiB}, cands, full_ledger()) == ["recent"]
    cands[2] = EvictionCandidate("recent", 300.0, {"cuda:0": 10 * GiB}, busy=True)
    assert choose_evictions({"cuda:0": 6 * GiB}, cands, full_ledger()) is None


def test_holdings_come_from_the_ledger_when_not_given() -> None:
    cands = [EvictionCandidate(c.name, c.last_used) for c in candidates()]
    assert choose_evictions({"cuda:0": 6 * GiB}, cands, full_ledger()) == ["older"]


def test_models_on_other_devices_do_not_help() -> None:
    lg = full_ledger()
    lg.reserve("elsewhere", {"cuda:1": 20 * GiB})
    cands = [*candidates(), EvictionCandidate("elsewhere", 1.0)]
    assert choose_evictions({"cuda:0": 6 * GiB}, cands, lg) == ["older"]
    assert choose_evictions({"cuda:0": 30 * GiB}, cands, lg) is None  # more than the GPU


def test_many_candidates_fall_back_to_greedy() -> None:
    lg = Ledger([gpu(0, 100 * GiB), host(64 * GiB)])
    cands = [EvictionCandidate(f"m{i}", float(i), {"cuda:0": GiB}) for i in range(60)]
    for c in cands:
        lg.reserve(c.name, dict(c.held))
    chosen = choose_evictions({"cuda:0": 45 * GiB}, cands, lg)
    # 40 GiB free, 5 more needed: the five least recently used
    assert chosen == ["m0", "m1", "m2", "m3", "m4"]


def test_observe_counts_what_is_neither_free_nor_ours_as_external() -> None:
    lg = ledger()
    lg.reserve("ours", {"cuda:0": 10 * GiB})
    # NVML: 24 GiB total, 8 GiB free; our child uses 6 of its 10 GiB so far (still loading)
    lg.observe(gpu(0, 24 * GiB, free=8 * GiB), corral_used=6 * GiB)
    # someone else holds 24 - 8 - 6 = 10 GiB; budget 24 - 1 reserve - 10 = 13, ours holds 10
    assert lg.free("cuda:0") == 3 * GiB
    lg.observe(gpu(0, 24 * GiB), corral_used=0)  # no probe value: unchanged
    assert lg.free("cuda:0") == 3 * GiB
