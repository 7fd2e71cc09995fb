"""``POST /api/pull``: fetch a configured model's files, with Ollama's progress lines.

corral pulls only what its config defines: a model (or alias, or ``name:latest``) whose files
come from ``hf:`` or ``ollama:``. The pull starts the model's download, or joins the one a
request or another pull started (``ManagedModel.download``: one download per model, shared),
and reports it as Ollama does: ``pulling manifest``, ``pulling <digest>`` with ``total`` and
``completed`` bytes, ``verifying sha256 digest``, ``writing manifest``, ``success``. A model
with its files already on disk is ``success`` at once. A name the config does not define is
a 404 saying to add it there: an API request never chooses what corral downloads.

It needs an inference key, like the chat request that would start the same download for the
same model (``download: request``); a ``download: manual`` model is not fetched by it either
(its pull fails with the reason, as its requests do). A client that leaves stops its stream,
not the download.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from corral.config.schema import ResolvedKey
from corral.errors import DownloadError, ModelNotFoundError, ModelUnavailableError
from corral.proxy.body import read_body
from corral.proxy.errors import BadRequestError
from corral.proxy.handlers import Proxy, _client, _request_id, endpoint
from corral.proxy.routing import parse_body
from corral.sources.download import Fetch, Progress
from corral.supervisor import ManagedModel

log = structlog.get_logger("corral.proxy")

# How often a stream looks at the download: its progress moves about every 10 MB, and a
# client's progress bar needs no more than a few updates a second.
POLL = 0.5
NDJSON = "application/x-ndjson"
# Ollama's steps, in order: a line for each is sent even when the poll did not see it.
_STEPS = ("pulling manifest", "pulling", "verifying sha256 digest", "writing manifest",
          "success")
_STEP_OF = {"checking": 0, "downloading": 1, "verifying": 2, "done": 3, "failed": 0}
_NOT_CONFIGURED = ("; corral pulls only the models its config defines: add it under models: "
                   "with hf: owner/repo:QUANT (or ollama: name:tag) and reload corral "
                   "(SIGHUP or POST /admin/reload)")

Find = Callable[[str, ResolvedKey], ManagedModel]


async def pull(request: Request, proxy: Proxy, find: Find) -> Response:
    """The handler (behind an inference key: ``request.state.key``)."""
    started = time.perf_counter()
    request_id = _request_id(request)
    data = parse_body(await read_body(request, proxy.limits.max_body,
                                      proxy.limits.body_timeout))
    asked = data.get("model") or data.get("name")
    if not isinstance(asked, str) or not asked:
        raise BadRequestError("\"model\" must name a model", code="model_required")
    streams = data.get("stream", True)
    if not isinstance(streams, bool):
        raise BadRequestError("\"stream\" must be true or false", code="invalid_stream")
    try:
        model = find(asked, request.state.key)
    except ModelNotFoundError as exc:
        raise BadRequestError(str(exc) + _NOT_CONFIGURED, code="model_not_found",
                              status=404) from None
    fetch = model.download()
    transition = model.transition
    headers = {"X-Request-Id": request_id}

    def done(outcome: str) -> None:
        seconds = time.perf_counter() - started
        proxy.instruments.request_done(model.name, endpoint(request), 200, seconds, None)
        log.info("request", request_id=request_id, model=model.name, client=_client(request),
                 method=request.method, path=request.url.path, status=200, action="pull",
                 outcome=outcome, seconds=round(seconds, 4))

    if fetch is None:
        _check_present(model)
        done("present")
        if not streams:
            return JSONResponse({"status": "success"}, headers=headers)
        return StreamingResponse(_encode([{"status": "pulling manifest"},
                                          {"status": "success"}]),
                                 media_type=NDJSON, headers=headers)
    lines = _lines(fetch, transition, done, lambda: proxy.drain.draining)
    if streams:
        return StreamingResponse(lines, media_type=NDJSON, headers=headers)
    last = b""
    async for line in lines:  # the same steps, unseen: only the end is answered
        last = line
    answer = json.loads(last)
    if "error" in answer:
        return JSONResponse(answer, status_code=503, headers={**headers, "Retry-After": "5"})
    return JSONResponse(answer, headers=headers)


def _check_present(model: ManagedModel) -> None:
    """Nothing to fetch: its files must be there (a ``path:`` model), else say why not."""
    if model.needs_files:  # being removed by a reload: it starts no download any more
        raise ModelUnavailableError(
            model.name, f"its files cannot be fetched while it is {model.state.value}", 5.0)
    path = model.local_spec.path
    if path is None or not os.path.isfile(path):
        raise BadRequestError(
            f"the model file of {model.name!r} is missing: {path} (its path: in the config)",
            code="model_file_missing", status=500)


async def _settled(transition: asyncio.Task[None] | None) -> None:
    # The model takes its files when its download task ends, just after the fetch: wait for
    # that, so that /api/tags lists it as soon as the client reads "success".
    if transition is not None:
        await asyncio.wait({transition})


async def _encode(lines: list[dict[str, Any]]) -> AsyncIterator[bytes]:
    for line in lines:
        yield _line(line)


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


async def _lines(fetch: Fetch, transition: asyncio.Task[None] | None,
                 done: Callable[[str], None], draining: Callable[[], bool],
                 ) -> AsyncIterator[bytes]:
    """The stream: a line per step and per progress of the download, until it ends, or
    until corral drains (the download stops with corral: the drain need not wait for it)."""
    outcome = "left"  # cancelled by Starlette when the client disconnects
    steps = _Steps(fetch.progress)
    waiter = asyncio.ensure_future(fetch.result())  # shielded: cancelling it leaves the fetch
    try:
        finished = False
        while not finished:
            for line in steps.advance(None):
                yield _line(line)
            finished = bool((await asyncio.wait({waiter}, timeout=POLL))[0])
            if not finished and draining():
                outcome = "shutdown"
                yield _line({"error": "corral is shutting down: the download stops here and "
                                      "resumes where it stopped when corral starts again"})
                return
        try:
            waiter.result()
        except DownloadError as exc:
            outcome = "failed"
            yield _line({"error": exc.reason})
            return
        for line in steps.advance(3):
            yield _line(line)
        await _settled(transition)
        for line in steps.advance(4):
            yield _line(line)
        outcome = "success"
    finally:
        waiter.cancel()
        done(outcome)


class _Steps:
    """Ollama's lines for one fetch's progress, each step once and in order; the download's
    bytes as ``pulling <digest>`` lines whenever they moved."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.step = -1
        self.sent: tuple[int, int] | None = None  # (completed, total) last sent
        self.size = 0  # the download's total, kept once it moves on to verifying

    def advance(self, least: int | None) -> list[dict[str, Any]]:
        """The lines since the last call; ``least``: the step reached at least (the fetch
        ended: 3 for its files, 4 once the model has them)."""
        progress = self.progress
        progress.refresh()
        now = _STEP_OF[progress.phase]
        if progress.phase == "downloading":
            self.size = progress.total
        target = max(now, least or 0)
        lines: list[dict[str, Any]] = []
        while self.step < target:
            self.step += 1
            if self.step == 1:
                continue  # the download's own lines, below
            if self.step == 2:
                lines += self._pulling(final=True)
            lines.append({"status": _STEPS[self.step]})
        if self.step == 1:
            lines += self._pulling(final=False)
        return lines

    def _pulling(self, final: bool) -> list[dict[str, Any]]:
        progress = self.progress
        if progress.digest is None:  # nothing was downloaded (an ollama: model, read in place)
            return []
        total = self.size or progress.total
        completed = total if final else min(progress.done, total)
        if self.sent == (completed, total):
            return []
        self.sent = (completed, total)
        return [{"status": f"pulling {progress.digest[:12]}", "digest": f"sha256:"
                 f"{progress.digest}", "total": total, "completed": completed}]
