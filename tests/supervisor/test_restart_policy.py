"""RestartPolicy on its own: the back-off curve, its jitter, give-up and the failure window.

The integration tests in test_faults.py see these through a real corral, seconds at a time;
here the clock and the random source are the test's, so the whole curve is checked at once.
"""

from __future__ import annotations

import random

import pytest

from corral.supervisor.restarts import MAX_BACKOFF, RestartPolicy, backoff

# The wait ceilings after 1, 2, 3, ... failures: 1s doubling, capped at 60s.
CEILINGS = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


def waits(policy: RestartPolicy, count: int) -> list[float]:
    """The back-off after each of ``count`` failures one second apart."""
    return [policy.record(float(t)) for t in range(count)]


def test_waits_start_at_one_second_and_double_up_to_the_cap() -> None:
    # rng 0 gives the floor (half the ceiling), rng near 1 the ceiling itself.
    low = RestartPolicy(max_failures=100, window=3600, rng=lambda: 0.0)
    high = RestartPolicy(max_failures=100, window=3600, rng=lambda: 1.0 - 1e-12)
    assert waits(low, len(CEILINGS)) == [c / 2 for c in CEILINGS]
    assert waits(high, len(CEILINGS)) == pytest.approx(CEILINGS)
    assert MAX_BACKOFF == 60.0


def test_far_past_the_cap_the_wait_stays_capped() -> None:
    # max_failures has no upper bound, so with a long window the count can pass 1024, where
    # 2.0 ** (failures - 1) overflows a float.
    assert backoff(5000, 0.5) == 45.0
    policy = RestartPolicy(max_failures=10_000, window=10**9, rng=lambda: 0.0)
    assert waits(policy, 2000)[-1] == 30.0


def test_jitter_stays_between_half_and_all_of_the_ceiling_and_varies() -> None:
    rng = random.Random(1234)
    for failures, ceiling in enumerate(CEILINGS, start=1):
        spread = [backoff(failures, rng.random()) for _ in range(200)]
        assert all(ceiling / 2 <= w < ceiling for w in spread)
        # Corrals that failed together must not retry in lockstep.
        assert len(set(spread)) > 100
    # Twenty models that failed at the same moment wait different times before their retry.
    first = [RestartPolicy(100, 3600, rng=random.Random(seed).random).record(0.0)
             for seed in range(20)]
    assert len(set(first)) > 1 and all(0.5 <= w < 1.0 for w in first)
    # The policy's default random source also stays within the bounds.
    policy = RestartPolicy(max_failures=100, window=3600)
    for wait, ceiling in zip(waits(policy, len(CEILINGS)), CEILINGS, strict=True):
        assert ceiling / 2 <= wait < ceiling


def test_gives_up_after_max_failures_within_the_window() -> None:
    policy = RestartPolicy(max_failures=3, window=600, rng=lambda: 0.0)
    policy.record(0.0)
    policy.record(100.0)
    assert not policy.given_up and policy.recent == 2
    policy.record(200.0)
    assert policy.given_up and policy.recent == 3
    # An operator's load clears it: the model gets a fresh start and the short waits again.
    policy.clear()
    assert not policy.given_up and policy.recent == 0
    assert policy.record(300.0) == 0.5


def test_failures_older_than_the_window_are_forgotten() -> None:
    policy = RestartPolicy(max_failures=3, window=10, rng=lambda: 0.0)
    policy.record(0.0)
    policy.record(5.0)
    # The failure at 0 is more than 10s old: two recent failures, not three, so no give-up,
    # and the back-off is the one for a second failure.
    assert policy.record(10.5) == 1.0
    assert policy.recent == 2 and not policy.given_up
    # Long after, the count (and the back-off) starts again from one.
    assert policy.record(100.0) == 0.5
    assert policy.recent == 1 and not policy.given_up


def test_failures_spread_wider_than_the_window_never_give_up() -> None:
    policy = RestartPolicy(max_failures=3, window=60, rng=lambda: 0.0)
    for t in range(0, 3000, 31):  # at most two failures in any 60s
        policy.record(float(t))
        assert not policy.given_up
