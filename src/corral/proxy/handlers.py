"""The request handlers: route by model, check the key, admit, load on demand, stream back."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive

from corral.config import Config
from corral.config.schema import ResolvedKey
from corral.echo import clip
from corral.errors import (
    ClientGoneError,
    CorralError,
    ModelNotFoundError,
    ModelUnavailableError,
    QueueFullError,
    QueueTimeoutError,
    UpstreamError,
)
from corral.metrics import CorralMetrics
from corral.proxy.admission import AdmissionQueue, AdmissionQueues
from corral.proxy.auth import OPEN, Authenticator, may_use
from corral.proxy.body import read_body
from corral.proxy.clientwatch import ClientWatch
from corral.proxy.drain import DrainState
from corral.proxy.errors import CLIENT_CLOSED_REQUEST, BadRequestError, response_for
from corral.proxy.forward import UpstreamResponse, send_upstream
from corral.proxy.purposes import check_purpose
from corral.proxy.routing import SLOTLESS_PATHS, check_fields, model_name, parse_body
from corral.supervisor import Lease, ManagedModel, Supervisor
from corral.supervisor.childhttp import Upstream

log = structlog.get_logger("corral.proxy")

Handler = Callable[[Request], Awaitable[Response]]
# Makes the client's answer from the child's open response: ``UpstreamResponse`` passes it
# through; another API's translation (``corral.proxy.ollama``) subclasses it.
Responder = Callable[[Upstream, Callable[[], None], list[tuple[bytes, bytes]]],
                     UpstreamResponse]


class Proxy:
    """The handlers of one app, with the supervisor it asks for leases and the queues."""

    def __init__(
        self, config: Config, supervisor: Supervisor, metrics: CorralMetrics,
        queues: AdmissionQueues, drain: DrainState,
    ) -> None:
        self.supervisor = supervisor
        self.metrics = metrics
        self.instruments = metrics.instruments
        self.queues = queues
        self.drain = drain
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Take a (new) configuration: keys, limits, default model, a queue per model."""
        self.config = config
        self.auth = Authenticator(config.api_keys)
        self.default_model = config.file.default_model
        self.unknown_to_default = config.file.unknown_model_to_default
        self.limits = config.file.limits
        self.queues.configure(config, self.supervisor.models)

    def require(self, request: Request, scope: str) -> ResolvedKey:
        """The request's key, if it has ``scope``; raises 401/403 otherwise."""
        return self.auth.authenticate(request.headers, scope)

    def find(self, name: str, key: ResolvedKey, fallback: bool = False) -> ManagedModel:
        """The model ``name`` names, if ``key`` may use it.

        Otherwise 404, listing only the models ``key`` may use: a model (or alias) it may not
        use is answered exactly like one that does not exist, so a key learns no other names.
        With ``fallback`` and ``unknown_model_to_default``, a name corral does not know is
        the default model (a single llama-server ignores the name).
        """
        try:
            model = self.supervisor.get(name)
        except ModelNotFoundError as exc:
            default = self._default_for_unknown(key) if fallback else None
            if default is not None:
                return default
            if key.models is None:
                raise
            known = exc.available
        else:
            if may_use(key, model.name):
                return model
            known = self.supervisor.config.model_names()
        config = self.supervisor.config
        mine = [n for n in known
                if (spec := config.resolve(n)) is not None and may_use(key, spec.name)]
        raise ModelNotFoundError(name, mine) from None

    def _default_for_unknown(self, key: ResolvedKey) -> ManagedModel | None:
        # A key that may not use the default gets the 404 of the name it sent, not the
        # default's name.
        if not (self.unknown_to_default and self.default_model):
            return None
        try:
            model = self.supervisor.get(self.default_model)
        except ModelNotFoundError:
            return None
        return model if may_use(key, model.name) else None

    async def inference(self, request: Request) -> Response:
        """POST on a model endpoint: route by ``model``, admit, load on demand, stream back."""
        started = time.perf_counter()
        request_id = _request_id(request)
        name = ""
        try:
            key = self.require(request, "inference")
            body = await read_body(request, self.limits.max_body, self.limits.body_timeout)
            payload = parse_body(body)
            asked = model_name(payload, self.default_model, self.unknown_to_default)
            model = self.find(asked, key, fallback=True)
            name = model.name
            check_purpose(request.url.path, model.spec)
            check_fields(request.url.path, payload, model.plan.n_vocab if model.plan else None,
                         model.spec.multimodal)
            uses_slot = request.url.path not in SLOTLESS_PATHS
            return await self._forward(request, model, body, request_id, started, uses_slot,
                                       streams=payload.get("stream") is True)
        except CorralError as exc:
            return self._error(request, name, exc, request_id, started)

    async def model_get(self, request: Request) -> Response:
        """llama-server's endpoints that name no model in a body, for ``?model=`` or default.

        ``GET /props`` and ``GET /lora-adapters`` load the model, as a single-server client asks
        them before its first request. ``GET /slots`` never loads one (monitoring must not keep a
        model from going idle). ``POST /slots/{id}`` (save, restore, erase a slot's cache) and
        ``POST /lora-adapters`` change a child for everyone: they need the admin scope and a
        model that is already loaded.
        """
        started = time.perf_counter()
        request_id = _request_id(request)
        name = ""
        path = request.url.path
        changes = request.method == "POST"
        try:
            key = self.require(request, "admin" if changes else "inference")
            asked = request.query_params.get("model") or self.default_model
            if not asked:
                raise BadRequestError(
                    f"{path} needs ?model= when corral has no default_model",
                    code="model_required",
                )
            model = self.find(asked, key, fallback=True)
            name = model.name
            body = (await read_body(request, self.limits.max_body, self.limits.body_timeout)
                    if changes else b"")
            if (changes or path == "/slots") and not model.state.serving:
                raise ModelUnavailableError(
                    model.name, f"it is {model.state}; {path} does not load models", 5.0)
            return await self._forward(request, model, body, request_id, started, False,
                                       touch=path != "/slots")
        except CorralError as exc:
            return self._error(request, name, exc, request_id, started)

    async def _forward(
        self,
        request: Request,
        model: ManagedModel,
        body: bytes,
        request_id: str,
        started: float,
        uses_slot: bool,
        touch: bool = True,
        streams: bool = True,
        upstream_path: str | None = None,
        respond: Responder = UpstreamResponse,
    ) -> Response:
        """Admit (when it ``uses_slot``), lease, send ``body`` to the child at ``upstream_path``
        (default: the request's own path) and answer with ``respond``; counted and logged once
        when the answer ends. Raises corral's errors before the answer starts."""
        queue = self.queues.get(model.name)
        if queue is None:  # a reload removed the model while this request was being read
            raise ModelUnavailableError.removed(model.name)
        if uses_slot:
            asked = time.monotonic()
            try:
                waited = await queue.admit(ClientWatch(request.receive).left)
            except (QueueTimeoutError, ClientGoneError):
                # The longest waits end this way; leaving them out would hide a saturated queue.
                self.instruments.queue_wait.labels(model.name).observe(time.monotonic() - asked)
                raise
            self.instruments.queue_wait.labels(model.name).observe(waited)
        try:
            sending = self._send(request, model, body, queue if uses_slot else None, touch,
                                 streams, upstream_path)
            if uses_slot:
                # A non-streamed answer has no headers until it is complete: a client that
                # leaves meanwhile must free the child's slot now, not after the generation.
                lease, upstream = await _unless_client_leaves(request.receive, sending)
            else:
                lease, upstream = await sending
        except BaseException:
            if uses_slot:
                queue.release()
            raise

        def finish() -> None:
            # Runs when the stream is done, so the line has the real duration and outcome.
            lease.release()
            if uses_slot:
                queue.release()
            seconds = time.perf_counter() - started
            ttft = (response.first_chunk_at - started
                    if response.is_sse and response.first_chunk_at else None)
            # The status line went out before the stream failed or the client left; the
            # metrics count how it ended, as the request would have been counted had it been
            # known up front.
            outcome = (CLIENT_CLOSED_REQUEST if response.client_gone
                       else 502 if response.upstream_error else upstream.status_code)
            self.instruments.request_done(model.name, endpoint(request), outcome, seconds,
                                          ttft)
            log.info("request", request_id=request_id, model=model.name,
                     client=_client(request), method=request.method,
                     path=clip(request.url.path),
                     status=upstream.status_code, client_gone=response.client_gone,
                     upstream_error=response.upstream_error, seconds=round(seconds, 4))

        response = respond(upstream, finish, [(b"x-request-id", request_id.encode())])
        return response  # type: ignore[return-value]

    async def _send(
        self,
        request: Request,
        model: ManagedModel,
        body: bytes,
        queue: AdmissionQueue | None,
        touch: bool = True,
        streams: bool = True,
        upstream_path: str | None = None,
    ) -> tuple[Lease, Upstream]:
        """A lease and the child's open response; waits for a load or restart if needed.

        While it waits for the model, an admitted request counts as queued (``loading``).
        """
        for attempt in (1, 2):
            if queue is not None:
                queue.loading += 1
            try:
                lease = await self.supervisor.acquire(model, touch)
            finally:
                if queue is not None:
                    queue.loading -= 1
            try:
                assert lease.process.session is not None
                upstream = await send_upstream(
                    lease.process.session, model.name, request.method,
                    upstream_path or request.url.path,
                    request.scope["query_string"], request.headers.raw, body,
                    # The read timeout bounds the silence between chunks of a stream. A
                    # non-streamed answer is silent until done: it gets the (long) generation
                    # timeout instead, so a long generation is not cut short by mistake.
                    answer_within=None if streams
                    else lease.process.upstream.generation_timeout,
                )
            except UpstreamError as exc:
                lease.release()
                if attempt == 2 or exc.delivered:
                    raise
                # The child produced nothing for this request. Alive: the pooled connection was
                # stale, try a fresh one. Dead and it refused the connection: it crashed under
                # an earlier request; acquire() now waits for the restart. Dead after accepting
                # this request: it may have died of it, so it is not sent again.
                if await lease.process.exited_within(0.5):
                    if not exc.refused:
                        raise
                    await lease.model.notice_exit(lease.process, 10.0)
                continue
            except BaseException:
                lease.release()
                raise
            return lease, upstream
        raise AssertionError("unreachable")

    def _error(
        self, request: Request, model: str, exc: CorralError, request_id: str, started: float
    ) -> Response:
        response = response_for(exc, {"X-Request-Id": request_id})
        seconds = time.perf_counter() - started
        if isinstance(exc, QueueFullError | QueueTimeoutError):
            reason = "full" if isinstance(exc, QueueFullError) else "timeout"
            self.instruments.rejected.labels(model, reason).inc()
        if model:  # only configured names become label values, never what a client typed
            self.instruments.request_done(model, endpoint(request), response.status_code,
                                          seconds, None)
        log.info("request", request_id=request_id, model=model or None,
                 client=_client(request), method=request.method, path=clip(request.url.path),
                 status=response.status_code, error=str(exc), seconds=round(seconds, 4))
        return response

    # For the handlers of other APIs (corral.proxy.ollama): the same admission, counts, logs.
    forward = _forward
    answer_error = _error

    def guarded(
        self, handler: Handler, scope: str, public: Callable[[], bool] = lambda: False
    ) -> Handler:
        """``handler`` behind a key with ``scope`` (unless ``public()``); corral's errors
        become their HTTP answers."""
        async def checked(request: Request) -> Response:
            try:
                # Handlers that show only what the key may see read it here.
                request.state.key = OPEN if public() else self.require(request, scope)
                return await handler(request)
            except CorralError as exc:
                return response_for(exc)
        return checked

    async def metrics_text(self, request: Request) -> Response:
        """GET /metrics: corral's metrics and each child's, for Prometheus."""
        return Response(await self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def list_models(self, request: Request) -> Response:
        """GET /v1/models: every model and alias the key may use, in OpenAI form, with
        corral's details."""
        key: ResolvedKey = request.state.key
        models = [m for m in self.supervisor.models.values() if may_use(key, m.name)]
        data = [_model_entry(m, m.name) for m in models]
        for m in models:
            data += [_model_entry(m, alias, alias_of=m.name) for alias in m.spec.aliases]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["name"]
        key: ResolvedKey = request.state.key
        model = self.find(name, key)
        alias_of = None if name == model.name else model.name
        return JSONResponse(_model_entry(model, name, alias_of=alias_of))

    async def health(self, request: Request) -> Response:
        if self.drain.draining:
            # Load balancers stop sending here while in-flight requests finish.
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})


def _model_entry(
    model: ManagedModel, name: str, alias_of: str | None = None
) -> dict[str, Any]:
    # Only what is at hand: clients poll this, so no process or memory look-ups. The fields
    # of llama-server's own entry come first, for its clients; corral's under "corral".
    spec = model.spec
    meta: dict[str, int] = {}
    if model.plan is not None:
        meta["n_ctx"] = model.plan.ctx_per_slot
        if model.plan.n_vocab:
            meta["n_vocab"] = model.plan.n_vocab
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "corral",
        "aliases": [model.name, *spec.aliases],
        "tags": [],
        "architecture": {
            "input_modalities": ["text", "image"] if spec.multimodal else ["text"],
            "output_modalities": ["text"],
        },
        "meta": meta,
        "corral": {
            "state": str(model.state),
            "slots": model.slots,
            "ctx_per_slot": model.ctx_per_slot,
            "alias_of": alias_of,
        },
    }


async def _unless_client_leaves(
    receive: Receive, sending: Awaitable[tuple[Lease, Upstream]]
) -> tuple[Lease, Upstream]:
    """Await ``sending``, but give up (closing what it opened) once the client disconnects."""
    return await ClientWatch(receive).unless_left(sending, _close_unwanted)


def _close_unwanted(sent: tuple[Lease, Upstream]) -> None:
    # The client left: what the send still opened (or just did) is closed again.
    lease, upstream = sent
    lease.release()
    _background.add(closing := asyncio.ensure_future(upstream.aclose()))
    closing.add_done_callback(_background.discard)


_background: set[asyncio.Future[None]] = set()


def endpoint(request: Request) -> str:
    """The ``endpoint`` label: the route's template (``/slots/{slot}``), never the raw path,
    so a client cannot create a series per path it makes up."""
    route = request.scope.get("route")
    return route.path_format if isinstance(route, Route) else "other"


def _client(request: Request) -> str | None:
    # The peer's address, or what a trusted proxy (listen.trusted_proxies) says it forwarded.
    return request.client.host if request.client else None


def _request_id(request: Request) -> str:
    supplied = request.headers.get("x-request-id")
    # A client's id is kept when it is sane, so traces join up; anything else is replaced.
    if supplied and len(supplied) <= 128 and supplied.isprintable():
        return supplied
    return os.urandom(8).hex()
