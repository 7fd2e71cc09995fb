"""AdmissionQueue on its own: real asyncio, no llama-server needed.

Each step waits until the waiters it started are queued (``until``) before it looks.
"""

from __future__ import annotations

import asyncio

import pytest

from corral.errors import (
    ClientGoneError,
    ModelUnavailableError,
    QueueFullError,
    QueueTimeoutError,
)
from corral.proxy.admission import AdmissionQueue
from tests.conftest import until


def queue(slots: int = 1, limit: int = 2, timeout: float = 5.0) -> AdmissionQueue:
    return AdmissionQueue("m", slots=lambda: slots, limit=lambda _: limit, timeout=timeout)


async def test_free_slots_admit_at_once_then_requests_wait_in_order() -> None:
    q = queue(slots=2, limit=5)
    assert await q.admit() == 0.0
    assert await q.admit() == 0.0
    order: list[int] = []

    async def wait(i: int) -> None:
        await q.admit()
        order.append(i)

    waiters = [asyncio.create_task(wait(i)) for i in range(3)]
    await until(lambda: q.depth == 3)
    assert (q.in_flight, q.depth, order) == (2, 3, [])
    q.release()
    await until(lambda: order)
    assert (q.in_flight, q.depth, order) == (2, 2, [0])
    q.release()
    q.release()
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2]
    assert (q.in_flight, q.depth) == (2, 0)  # 5 admitted, 3 released


async def test_a_released_slot_goes_to_the_first_waiter_not_a_newcomer() -> None:
    q = queue()
    await q.admit()
    first = asyncio.create_task(q.admit())
    await until(lambda: q.depth == 1)
    q.release()
    # A newcomer arriving right after the release must queue behind the waiter it passed to.
    newcomer = asyncio.create_task(q.admit())
    await until(lambda: first.done() and q.depth == 1)  # the newcomer waits in the queue
    assert not newcomer.done()
    newcomer.cancel()


async def test_requests_waiting_for_a_load_count_against_the_limit() -> None:
    q = queue(slots=2, limit=2)
    await q.admit()
    await q.admit()
    q.loading = 2  # both admitted requests still wait for the model to start
    with pytest.raises(QueueFullError):
        await q.admit()
    q.loading = 1
    waiting = asyncio.create_task(q.admit())
    await until(lambda: q.depth == 2)
    assert q.depth == q.limit()
    with pytest.raises(QueueFullError):
        await q.admit()
    waiting.cancel()


async def test_full_queue_refuses() -> None:
    q = queue(slots=1, limit=1)
    await q.admit()
    waiting = asyncio.create_task(q.admit())
    await until(lambda: q.depth == 1)
    with pytest.raises(QueueFullError, match="1 requests already wait"):
        await q.admit()
    waiting.cancel()


async def test_zero_queue_means_refuse_when_busy() -> None:
    q = queue(slots=1, limit=0)
    await q.admit()
    with pytest.raises(QueueFullError):
        await q.admit()


async def test_timeout_leaves_the_queue() -> None:
    q = queue(timeout=0.05)
    await q.admit()
    with pytest.raises(QueueTimeoutError, match="no free slot within 0.05s"):
        await q.admit()
    assert q.depth == 0
    q.release()
    assert q.in_flight == 0


async def test_a_client_that_leaves_is_removed_at_once() -> None:
    q = queue()
    await q.admit()
    gone = asyncio.Event()
    task = asyncio.create_task(q.admit(gone.wait))
    await until(lambda: q.depth == 1)
    gone.set()
    with pytest.raises(ClientGoneError):
        await task
    assert q.depth == 0
    q.release()
    assert q.in_flight == 0


async def test_a_cancelled_waiter_does_not_leak_its_slot() -> None:
    q = queue()
    await q.admit()
    task = asyncio.create_task(q.admit())
    await until(lambda: q.depth == 1)
    q.release()  # the slot is handed to the waiter ...
    task.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await task
    assert q.in_flight == 0 and q.depth == 0


async def test_refused_waiters_get_the_error_and_no_slot() -> None:
    q = queue(slots=1, limit=5)
    await q.admit()
    waiters = [asyncio.create_task(q.admit()) for _ in range(2)]
    await until(lambda: q.depth == 2)
    assert q.holding == 3
    q.refuse_waiters(lambda: ModelUnavailableError("m", "removed"))
    for waiter in waiters:
        with pytest.raises(ModelUnavailableError, match="removed"):
            await waiter
    assert (q.in_flight, q.depth, q.holding) == (1, 0, 1)
    q.release()
    assert await q.admit() == 0.0  # no slot was lost to the refused waiters
