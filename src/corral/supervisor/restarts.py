"""When to try a failed model again, and when to stop trying.

Every failed load and every crash is a failure. After one, the next try waits an exponential
back-off with jitter (1s doubling to 60s, each wait between half and all of that); after
``max_failures`` within ``window`` the model is given up on until an operator loads it again.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable

BASE_BACKOFF = 1.0
MAX_BACKOFF = 60.0


class RestartPolicy:
    """A model's recent failures and the back-off they earn.

    Usage::

        policy = RestartPolicy(max_failures=5, window=600)
        wait = policy.record(now)      # seconds until the next try
        if policy.given_up: ...        # too many failures: stay failed
    """

    def __init__(
        self, max_failures: int, window: float, rng: Callable[[], float] = random.random
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self._rng = rng
        self._failures: deque[float] = deque()
        self.given_up = False

    @property
    def recent(self) -> int:
        return len(self._failures)

    def record(self, now: float) -> float:
        """Count a failure at ``now``; return the back-off before the next try."""
        while self._failures and now - self._failures[0] > self.window:
            self._failures.popleft()
        self._failures.append(now)
        if len(self._failures) >= self.max_failures:
            self.given_up = True
        return backoff(len(self._failures), self._rng())

    def clear(self) -> None:
        self._failures.clear()
        self.given_up = False


def backoff(failures: int, jitter: float) -> float:
    """The wait after ``failures`` failures in a row; ``jitter`` in [0, 1) spreads it.

    Jitter keeps many corrals (or models) that failed together from retrying in lockstep.
    """
    # The exponent is bounded: past the cap it changes nothing, and 2.0 ** 1024 overflows, which
    # a config with a large max_failures and a long window can reach.
    ceiling = min(MAX_BACKOFF, BASE_BACKOFF * 2.0 ** min(failures - 1, 64))
    return ceiling * (0.5 + jitter / 2)
