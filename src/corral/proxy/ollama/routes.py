"""The Ollama API's routes, on corral's port, through corral's own machinery.

Generation and embeddings go through ``Proxy.forward`` exactly as an OpenAI request does: the
same keys (``Authorization: Bearer``), per-key model lists, admission queue, load on demand,
metrics (``endpoint`` is the route, ``/api/chat``) and log line; only the body going up and the
answer coming back are translated (``translate``, ``stream``). Errors are Ollama's
``{"error": "..."}`` with corral's status codes.

``keep_alive`` sets how long the model stays loaded once idle (``ManagedModel.keep_for``,
which the idle reaper reads instead of its ``ttl``), when the answer ends; a request without it
puts the configured ``ttl`` back. A request with nothing to generate loads the model
(``done_reason: "load"``), or with ``keep_alive: 0`` unloads it (``done_reason: "unload"``):
now, through the supervisor as the admin API does, for a key with the admin scope or when no
one else is using the model; for an inference key while others are, at its first idle moment.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from corral.config.schema import ResolvedKey
from corral.echo import clip
from corral.errors import CorralError, ModelNotFoundError
from corral.placement.devices import CPU
from corral.proxy.auth import may_use
from corral.proxy.body import read_body
from corral.proxy.errors import BadRequestError
from corral.proxy.handlers import Handler, Proxy, _client, _request_id, endpoint
from corral.proxy.ollama import translate
from corral.proxy.ollama.describe import Description, describe
from corral.proxy.ollama.manage import MANAGEMENT, refuse_management
from corral.proxy.ollama.pull import pull
from corral.proxy.ollama.stream import Answer, now
from corral.proxy.routing import model_name, parse_body
from corral.supervisor import ManagedModel
from corral.supervisor.childhttp import Upstream
from corral.supervisor.state import ModelState

log = structlog.get_logger("corral.proxy")

# The Ollama version corral answers like. Clients compare it (Open WebUI needs >= 0.1.x for
# /api/chat, newer features check more): numeric x.y.z, the API this module follows.
OLLAMA_VERSION = "0.12.0"
_NEVER = 2**63 - 1  # Ollama's "for ever": the longest duration, in ns, from now
Translate = Callable[[dict[str, Any], translate.Model], translate.Translated]


def tag(name: str) -> str:
    """A model name as Ollama lists it: with a tag (``:latest`` when it has none)."""
    return name if ":" in name else f"{name}:latest"


def ollama_error(response: Response) -> Response:
    """corral's OpenAI-shaped error as Ollama's ``{"error": "..."}``, same status and headers
    (``Retry-After``, ``X-Request-Id``, ``WWW-Authenticate``)."""
    try:
        error = json.loads(bytes(response.body))["error"]
        message = error["message"] if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        return response
    headers = {k: v for k, v in response.headers.items()
               if k.lower() not in ("content-length", "content-type")}
    return JSONResponse({"error": message}, status_code=response.status_code, headers=headers)


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat().replace("+00:00", "Z")


class OllamaApi:
    """The handlers, over one ``Proxy``."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def find(self, name: str, key: ResolvedKey, fallback: bool = False) -> ManagedModel:
        """``name`` as Ollama clients write it: ``name:latest`` is ``name``. With
        ``fallback`` (generation and embeddings) and ``unknown_model_to_default``, a name
        corral knows neither way is the default model, as for an OpenAI request."""
        try:
            return self.proxy.find(name, key)
        except ModelNotFoundError:
            if not name.endswith(":latest"):
                if fallback:
                    return self.proxy.find(name, key, fallback=True)
                raise
        return self.proxy.find(name.removesuffix(":latest"), key, fallback=fallback)

    def _describe(self, model: ManagedModel) -> Description:
        if model.needs_files:  # as Ollama answers for a model not pulled yet
            raise BadRequestError(
                f"model {model.name!r} is not downloaded yet: POST /api/pull, or send it a "
                "request, to fetch it", code="model_not_downloaded", status=404)
        try:
            return describe(model.local_spec)
        except (OSError, ValueError) as exc:
            raise BadRequestError(f"cannot read the model file of {model.name!r}: {exc}",
                                  code="model_unreadable", status=500) from None

    # -- generation and embeddings -------------------------------------------------------------

    def handler(self, convert: Translate) -> Handler:
        """A POST handler that translates with ``convert`` and forwards like any request."""
        async def handle(request: Request) -> Response:
            return await self._handle(request, convert)
        return handle

    async def _handle(self, request: Request, convert: Translate) -> Response:
        proxy = self.proxy
        started = time.perf_counter()
        arrived = time.monotonic()  # which keep_alive wins: the last request to arrive
        request_id = _request_id(request)
        name = ""
        try:
            key = proxy.require(request, "inference")
            body = await read_body(request, proxy.limits.max_body, proxy.limits.body_timeout)
            data = parse_body(body)
            asked = model_name(data, proxy.default_model, proxy.unknown_to_default)
            model = self.find(asked, key, fallback=True)
            name = model.name
            # A model whose files are not fetched yet cannot be described: the request goes
            # on (it starts or joins the download) and llama-server judges it once loaded.
            about = None if model.needs_files else self._describe(model)
            spec = model.local_spec
            translated = convert(data, translate.Model(
                model.ctx_per_slot, spec.multimodal,
                about is None or "thinking" in about.capabilities))
            if translated.empty:  # loading or unloading asks nothing the model cannot do
                return await self._load_or_unload(request, key, model, asked, translated,
                                                  request_id, started)
            if about is not None:
                _check_capability(translated, about)
            was_serving = model.state.serving

            def answer(upstream: Upstream, finish: Callable[[], None],
                       headers: list[tuple[bytes, bytes]]) -> Answer:
                def done() -> None:
                    # before the lease's release; as of when it arrived
                    model.keep_for(translated.keep_alive, arrived)
                    finish()
                return Answer(upstream, done, headers, translated=translated, model=asked,
                              started=started,
                              load_seconds=lambda: 0.0 if was_serving else model.load_seconds)

            return await proxy.forward(
                request, model, json.dumps(translated.body).encode(), request_id, started,
                True, upstream_path=translated.path, respond=answer,
                # Embeddings come back whole: bounded by the generation timeout, not as a
                # stream's silence between chunks.
                streams=translated.mode in ("chat", "generate"))
        except CorralError as exc:
            return ollama_error(proxy.answer_error(request, name, exc, request_id, started))

    async def _load_or_unload(
        self, request: Request, key: ResolvedKey, model: ManagedModel, asked: str,
        translated: translate.Translated, request_id: str, started: float,
    ) -> Response:
        supervisor = self.proxy.supervisor
        action = reason = "unload"
        if translated.keep_alive == 0:
            if "admin" in key.scopes or not model.busy:
                await supervisor.unload(model.name, "manual")
            elif model.state.serving or model.state == ModelState.STARTING:
                # Others are using it: stopping it under them (their next requests waiting
                # for a reload) is the admin's act. An inference key's unload is Ollama's:
                # the model stops at its first idle moment, cutting no one short.
                model.keep_for(0)
                action = "unload_when_idle"
        else:
            was_serving = model.state.serving
            (await supervisor.acquire(model)).release()
            model.keep_for(translated.keep_alive)
            action = reason = "load"
        seconds = time.perf_counter() - started
        self.proxy.instruments.request_done(model.name, endpoint(request), 200, seconds, None)
        log.info("request", request_id=request_id, model=model.name, client=_client(request),
                 method=request.method, path=clip(request.url.path), status=200,
                 action=action, seconds=round(seconds, 4))
        body: dict[str, Any] = {"model": asked, "created_at": now()}
        if translated.mode == "chat":
            body["message"] = {"role": "assistant", "content": ""}
        elif translated.mode == "generate":
            body["response"] = ""
        elif translated.mode == "embed":
            body["embeddings"] = []
        else:
            return JSONResponse({"embedding": []}, headers={"X-Request-Id": request_id})
        if translated.mode != "embed":
            body.update({"done": True, "done_reason": reason})
        body["total_duration"] = int(seconds * 1e9)
        if reason == "load":
            body["load_duration"] = int((0.0 if was_serving else model.load_seconds) * 1e9)
        return JSONResponse(body, headers={"X-Request-Id": request_id})

    # -- what the models are -------------------------------------------------------------------

    def _named(self, key: ResolvedKey) -> list[tuple[str, ManagedModel]]:
        models = [m for m in self.proxy.supervisor.models.values() if may_use(key, m.name)]
        return [(n, m) for m in models for n in (m.name, *m.spec.aliases)]

    async def tags(self, request: Request) -> Response:
        """GET /api/tags: every model and alias the key may use."""
        listed = []
        for name, model in self._named(request.state.key):
            try:
                about = describe(model.local_spec)
            except (OSError, ValueError):
                continue  # unreadable now: /api/show names the problem
            listed.append({"name": tag(name), "model": tag(name),
                           "modified_at": about.modified_at, "size": about.size,
                           "digest": about.digest, "details": about.details()})
        return JSONResponse({"models": listed})

    async def ps(self, request: Request) -> Response:
        """GET /api/ps: the loaded models, their memory, real context and expiry."""
        running = []
        for model in self.proxy.supervisor.models.values():
            if not (model.state.serving and may_use(request.state.key, model.name)):
                continue
            try:
                about = describe(model.local_spec)
            except (OSError, ValueError):
                continue
            memory = model.plan.reservation if model.plan is not None else {}
            expires = model.expires_at()
            wall = (time.time() + _NEVER / 1e9 if expires is None
                    else time.time() + max(0.0, expires - time.monotonic()))
            running.append({
                "name": tag(model.name), "model": tag(model.name),
                "size": sum(memory.values()) or about.size,
                "digest": about.digest, "details": about.details(),
                "expires_at": _iso(min(wall, 253402300799.0)),
                "size_vram": sum(v for d, v in memory.items() if d != CPU),
                "context_length": model.ctx_per_slot or about.context_length,
            })
        return JSONResponse({"models": running})

    async def show(self, request: Request) -> Response:
        """POST /api/show: a model's details, template, metadata, capabilities and context."""
        data = parse_body(await read_body(request, self.proxy.limits.max_body,
                                          self.proxy.limits.body_timeout))
        asked = data.get("model") or data.get("name")
        if not isinstance(asked, str) or not asked:
            raise BadRequestError("\"model\" must name a model", code="model_required")
        model = self.find(asked, request.state.key)
        about = self._describe(model)
        ctx = model.ctx_per_slot
        parameters = f"num_ctx {ctx}" if ctx else ""
        source = model.spec.source
        origin = model.local_spec.path or (source.ref if source else "")
        return JSONResponse({
            "modelfile": f"# corral serves this model from its config\nFROM {origin}\n"
                         + (f"PARAMETER {parameters}\n" if parameters else ""),
            "parameters": parameters,
            "template": about.template,
            "details": about.details(),
            "model_info": {**about.info, "corral.slots": model.slots,
                           "corral.ctx_per_slot": ctx},
            "capabilities": list(about.capabilities),
            "modified_at": about.modified_at,
        })

    async def pull(self, request: Request) -> Response:
        """POST /api/pull: fetch a configured model's files, with Ollama's progress lines."""
        return await pull(request, self.proxy, self.find)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": OLLAMA_VERSION})

    async def root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")


def _check_capability(translated: translate.Translated, about: Description) -> None:
    embeds = "embedding" in about.capabilities
    if translated.mode in ("embed", "embeddings") and not embeds:
        raise BadRequestError(
            "this model does not support embeddings: corral starts it without --embeddings "
            "(add it to the model's args for an embedding model)", code="embeddings_unsupported")
    if translated.path == "/infill" and "insert" not in about.capabilities:
        raise BadRequestError(
            "this model does not support insert (\"suffix\"): its GGUF has no fill-in-the-"
            "middle tokens", code="insert_unsupported")
    if translated.mode in ("chat", "generate") and embeds:
        raise BadRequestError(
            f"this model does not support {translated.mode}: it is an embedding model "
            "(--embeddings in its args)", code="completion_unsupported")


def routes(proxy: Proxy) -> list[Route]:
    """The Ollama API's routes."""
    api = OllamaApi(proxy)

    def public_health() -> bool:
        return proxy.config.file.auth.public_health

    def guarded(handler: Handler, public: Callable[[], bool] = lambda: False) -> Handler:
        checked = proxy.guarded(handler, "inference", public)

        async def answer(request: Request) -> Response:
            response = await checked(request)
            return ollama_error(response) if response.status_code >= 400 else response
        return answer

    return [
        Route("/", guarded(api.root, public_health), methods=["GET"]),
        Route("/api/version", guarded(api.version, public_health), methods=["GET"]),
        Route("/api/tags", guarded(api.tags), methods=["GET"]),
        Route("/api/ps", guarded(api.ps), methods=["GET"]),
        Route("/api/show", guarded(api.show), methods=["POST"]),
        Route("/api/pull", guarded(api.pull), methods=["POST"]),
        Route("/api/chat", api.handler(translate.chat), methods=["POST"]),
        Route("/api/generate", api.handler(translate.generate), methods=["POST"]),
        Route("/api/embed", api.handler(translate.embed), methods=["POST"]),
        Route("/api/embeddings", api.handler(translate.embeddings), methods=["POST"]),
        *(Route(path, guarded(refuse_management), methods=methods)
          for path, methods in MANAGEMENT),
    ]

