"""Noticing that a client has gone, once its request body has been read.

After the body, the only message an ASGI server still delivers on ``receive`` is
``http.disconnect``: when the client closes its connection, and (uvicorn) once the response is
complete. Three waits end early on it: a place in the admission queue, the wait for the child's
first answer, and the stream of that answer back.

Usage::

    watch = ClientWatch(receive)
    await queue.admit(watch.left)                       # leaves the queue when the client does
    answer = await watch.unless_left(work, abandon)     # ClientGoneError if it goes first
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from starlette.types import Receive

from corral.errors import ClientGoneError

log = structlog.get_logger("corral.proxy")

T = TypeVar("T")


class ClientWatch:
    """Watches one request's ``receive`` for the client's disconnect."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive

    async def left(self) -> None:
        """Return once the client has gone (the body is already read, so nothing else arrives).

        Only a disconnect returns: if the client cannot be watched, this waits forever, and
        whatever it guards is awaited as it would be without a watch.
        """
        try:
            while (await self._receive())["type"] != "http.disconnect":
                pass
        except Exception as exc:
            log.warning("client_watch_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.Event().wait()

    async def unless_left(self, work: Awaitable[T], abandon: Callable[[T], None]) -> T:
        """Await ``work``, but raise ``ClientGoneError`` once the client disconnects.

        ``work`` is cancelled then; if it produced (or still produces) a result nobody will
        read, that result goes to ``abandon`` to be closed.
        """
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(self.left())

        def unwanted(done: asyncio.Future[T]) -> None:
            if not done.cancelled() and done.exception() is None:
                abandon(done.result())

        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.add_done_callback(unwanted)
            raise
        finally:
            watcher.cancel()
            task.cancel()  # a no-op when it is done
        if not watcher.done() or watcher.cancelled():
            return task.result()  # the work finished first
        task.add_done_callback(unwanted)
        raise ClientGoneError("client disconnected while its answer was prepared")
