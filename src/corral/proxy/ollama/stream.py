"""The child's answer as Ollama's: its SSE stream becomes NDJSON lines, its JSON one object.

The child is always asked to stream (``translate``): ``Answer`` turns each event into
Ollama's partial object (``message.content``/``message.thinking`` for ``/api/chat``,
``response``/``thinking`` for ``/api/generate``); a tool call, streamed in fragments by
llama-server, goes out whole once complete, as Ollama sends it; the last line has ``done: true``,
``done_reason`` and the timings in nanoseconds. A client that asked for ``stream: false`` gets
the same pieces merged into one object. An error before the first byte is ``{"error": ...}``
with the child's status (502 when it failed); after it, an ``{"error": ...}`` line ends the
stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import anyio.abc
import httpx
from starlette.types import Send

from corral.proxy.forward import UpstreamResponse
from corral.proxy.ollama.translate import Translated
from corral.supervisor.childhttp import Upstream

NDJSON = b"application/x-ndjson"
JSON = b"application/json"
_NS = 1_000_000  # nanoseconds per millisecond


def now() -> str:
    """Ollama's ``created_at``: RFC 3339 in UTC."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class Collector:
    """Turns the child's events into Ollama's partial objects and, at the end, its last one.

    Pure: no I/O, so each shape of event can be tested on its own.
    """

    def __init__(self, translated: Translated) -> None:
        self.chat = translated.mode == "chat"
        self.native = translated.native
        self.content: list[str] = []
        self.thinking: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish: str | None = None
        self.timings: dict[str, Any] = {}
        self.usage: dict[str, Any] = {}

    def feed(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """The partial object for one event, or None when it carries no text."""
        if isinstance(event.get("timings"), dict):
            self.timings = event["timings"]
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        if self.native:
            text, thought = str(event.get("content") or ""), ""
            if event.get("stop"):
                self.finish = "length" if event.get("stop_type") == "limit" else "stop"
                self.usage.setdefault("prompt_tokens", event.get("tokens_evaluated"))
        else:
            choices = event.get("choices") or [{}]
            choice = choices[0] if isinstance(choices[0], dict) else {}
            delta = choice.get("delta") or {}
            text = str(delta.get("content") or choice.get("text") or "")
            thought = str(delta.get("reasoning_content") or "")
            for call in delta.get("tool_calls") or []:
                self._add_call(call)
            if choice.get("finish_reason"):
                self.finish = "length" if choice["finish_reason"] == "length" else "stop"
        if not text and not thought:
            return None
        self.content.append(text)
        if thought:
            self.thinking.append(thought)
        return self._part(text, thought)

    def _add_call(self, delta: dict[str, Any]) -> None:
        call = self.calls.setdefault(int(delta.get("index", len(self.calls))),
                                     {"name": "", "arguments": ""})
        function = delta.get("function") or {}
        call["name"] += function.get("name") or ""
        call["arguments"] += function.get("arguments") or ""

    def tool_calls(self) -> list[dict[str, Any]]:
        """The complete tool calls, arguments as objects (as Ollama gives them).

        Raises ``ValueError`` when the model wrote arguments that are not a JSON object.
        """
        out = []
        for index in sorted(self.calls):
            call = self.calls[index]
            arguments = json.loads(call["arguments"] or "{}")
            if not isinstance(arguments, dict):
                raise ValueError(f"the arguments of tool call {call['name']!r} are not a JSON "
                                 "object")
            out.append({"function": {"index": index, "name": call["name"],
                                     "arguments": arguments}})
        return out

    def _part(self, text: str, thought: str) -> dict[str, Any]:
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thought:
                message["thinking"] = thought
            return {"message": message, "done": False}
        part: dict[str, Any] = {"response": text, "done": False}
        if thought:
            part["thinking"] = thought
        return part

    def calls_part(self) -> dict[str, Any] | None:
        """The tool calls as one partial object, for a stream (None: no calls)."""
        calls = self.tool_calls()
        if not calls:
            return None
        return {"message": {"role": "assistant", "content": "", "tool_calls": calls},
                "done": False}

    def final(self, whole: bool, total: float, load: float) -> dict[str, Any]:
        """The last object: ``done``, the reason, timings (ns); everything when ``whole``."""
        t = self.timings
        prompt_n = self.usage.get("prompt_tokens") or t.get("prompt_n") or 0
        eval_n = t.get("predicted_n") or self.usage.get("completion_tokens") or 0
        last: dict[str, Any] = {}
        text = "".join(self.content) if whole else ""
        thought = "".join(self.thinking) if whole else ""
        if self.chat:
            last["message"] = {"role": "assistant", "content": text}
            if thought:
                last["message"]["thinking"] = thought
            if whole and self.calls:
                last["message"]["tool_calls"] = self.tool_calls()
        else:
            last["response"] = text
            if thought:
                last["thinking"] = thought
        last.update({
            "done": True,
            "done_reason": self.finish or "stop",
            "total_duration": int(total * 1e9),
            "load_duration": int(load * 1e9),
            "prompt_eval_count": int(prompt_n),
            "prompt_eval_duration": int(float(t.get("prompt_ms") or 0) * _NS),
            "eval_count": int(eval_n),
            "eval_duration": int(float(t.get("predicted_ms") or 0) * _NS),
        })
        return last


def embedded(translated: Translated, data: Any, total: float, load: float) -> dict[str, Any]:
    """The child's embeddings as ``/api/embed``'s or ``/api/embeddings``' answer."""
    if translated.mode == "embeddings":  # llama-server's /embedding: [{"embedding": [[...]]}]
        first = data[0] if isinstance(data, list) and data else data
        vector = first.get("embedding", []) if isinstance(first, dict) else []
        if vector and isinstance(vector[0], list):
            vector = vector[0]
        return {"embedding": vector}
    rows = sorted(data.get("data") or [], key=lambda row: row.get("index", 0))
    return {"embeddings": [row["embedding"] for row in rows],
            "total_duration": int(total * 1e9), "load_duration": int(load * 1e9),
            "prompt_eval_count": int((data.get("usage") or {}).get("prompt_tokens") or 0)}


def upstream_message(body: bytes) -> str:
    """The message of an error the child answered (its OpenAI shape, or its raw text)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip() or "the model failed"
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error or data)


class Answer(UpstreamResponse):
    """An ASGI response that translates the child's open response as it streams.

    Cleanup (the lease, the slot, the request's count and log line) is the base class's:
    exactly once, whether it ends, the client leaves or the child fails.
    """

    untouched = False

    def __init__(
        self,
        upstream: Upstream,
        on_close: Callable[[], None],
        extra_headers: list[tuple[bytes, bytes]],
        *,
        translated: Translated,
        model: str,
        started: float,
        load_seconds: Callable[[], float],
    ) -> None:
        super().__init__(upstream, on_close, extra_headers)
        self.headers = list(extra_headers)  # the child's type and length are not ours
        self.translated = translated
        self.model = model
        self.started = started
        self.load_seconds = load_seconds
        self.is_sse = translated.stream  # so the first line counts as the time to first token
        self._started = False

    async def _stream(self, send: Send, group: anyio.abc.TaskGroup) -> None:
        upstream = self.upstream
        try:
            if upstream.status_code != 200:
                message = upstream_message(await upstream.aread())
                await self._whole(send, upstream.status_code, {"error": message})
                return
            if self.translated.mode in ("embed", "embeddings"):
                data = json.loads(await upstream.aread())
                total = time.perf_counter() - self.started
                answer = embedded(self.translated, data, total, self.load_seconds())
                await self._whole(send, 200, {"model": self.model, **answer})
                return
            collector = Collector(self.translated)
            async for event in _events(upstream):
                part = collector.feed(event)
                if part is not None and self.translated.stream:
                    await self._line(send, part)
            if self.translated.stream:
                calls = collector.calls_part()
                if calls is not None:
                    await self._line(send, calls)
            total = time.perf_counter() - self.started
            last = collector.final(not self.translated.stream, total, self.load_seconds())
        except (httpx.HTTPError, ValueError, _ChildError) as exc:
            self.upstream_error = (str(exc) if isinstance(exc, _ChildError)
                                   else f"{type(exc).__name__}: {exc}")
            error = {"error": f"the model failed: {self.upstream_error}"}
            if self._started:
                await self._line(send, error)
                await self._end(send)
            else:
                await self._whole(send, 502, error)
            return
        if self.translated.stream:
            await self._line(send, last, final=True)
        else:
            await self._whole(send, 200, last)

    def _stamp(self, part: dict[str, Any]) -> bytes:
        if "error" not in part:
            part = {"model": self.model, "created_at": now(), **part}
        return json.dumps(part, ensure_ascii=False).encode() + b"\n"

    async def _line(self, send: Send, part: dict[str, Any], final: bool = False) -> None:
        if not self._started:
            self._started = True
            await send({"type": "http.response.start", "status": 200,
                        "headers": [*self.headers, (b"content-type", NDJSON)]})
        if self.first_chunk_at is None:
            self.first_chunk_at = time.perf_counter()
        if final:
            self._finished = True
            # As the base class does: the slot is free before the client sees the end.
            await self._close()
            await send({"type": "http.response.body", "body": self._stamp(part),
                        "more_body": False})
            return
        await send({"type": "http.response.body", "body": self._stamp(part),
                    "more_body": True})

    async def _end(self, send: Send) -> None:
        self._finished = True
        await self._close()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _whole(self, send: Send, status: int, body: dict[str, Any]) -> None:
        content = self._stamp(body) if status == 200 else json.dumps(body).encode()
        self._finished = True
        await self._close()
        await send({"type": "http.response.start", "status": status,
                    "headers": [*self.headers, (b"content-type", JSON),
                                (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content, "more_body": False})


class _ChildError(Exception):
    """An ``error`` the child sent inside its stream."""


async def _events(upstream: Upstream) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of the child's SSE stream, until ``[DONE]`` or its end."""
    async for line in upstream.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if not isinstance(event, dict):
            continue
        if "error" in event:
            error = event["error"]
            raise _ChildError(error.get("message", error) if isinstance(error, dict)
                              else error)
        yield event
