"""Waiting for a child's answer while watching the client (``_unless_client_leaves``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from corral.errors import ClientGoneError
from corral.proxy.handlers import _unless_client_leaves
from tests.conftest import until


class Sent:
    """What ``send_upstream`` would hand back; ``close`` records what was given back."""

    def __init__(self) -> None:
        self.released = False
        self.closed = False

    def release(self) -> None:
        self.released = True

    async def aclose(self) -> None:
        self.closed = True


async def answer(after: float, sent: Sent) -> tuple[Any, Any]:
    await asyncio.sleep(after)
    return sent, sent


async def test_the_answer_comes_back_while_the_client_stays() -> None:
    sent = Sent()

    async def stays() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    assert await _unless_client_leaves(stays, answer(0.05, sent)) == (sent, sent)
    assert not sent.closed


async def test_a_client_that_leaves_gets_nothing_and_the_answer_is_closed() -> None:
    sent = Sent()

    async def leaves() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    with pytest.raises(ClientGoneError):
        await _unless_client_leaves(leaves, answer(0.0, sent))
    # A task that had just opened the answer closes it again (and gives its lease back).
    await until(lambda: sent.closed)
    assert sent.released


async def test_a_watch_that_fails_is_not_taken_for_a_client_gone() -> None:
    sent = Sent()

    async def broken() -> dict[str, Any]:
        raise RuntimeError("receive() failed")

    assert await _unless_client_leaves(broken, answer(0.05, sent)) == (sent, sent)
    assert not sent.closed
