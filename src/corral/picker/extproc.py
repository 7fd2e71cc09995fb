"""The gateway's side of the picker: an Envoy ``ext_proc`` (ExternalProcessor) gRPC server.

Envoy (as a Gateway API implementation configures it for an ``InferencePool``) opens one
``Process`` stream per request, sends the request headers and then the body in chunks as they
arrive (``request_body_mode: STREAMED`` with ``send_body_without_waiting_for_header_response``:
the chunks come before the headers are answered), and waits for an answer to each in order.
This server holds its answer to the headers until the body has named its model (usually in the
first chunk: ``ModelSniffer`` answers as soon as ``"model"`` is complete), asks the ``Picker``,
and then answers:

- the headers: ``x-gateway-destination-endpoint: ip:port`` (the pick; Envoy's ORIGINAL_DST
  cluster keyed by that header forwards there) and the dynamic metadata
  ``envoy.lb / x-gateway-destination-endpoint: "ip:port,ip:port,..."`` (the fallback list,
  best first, as the inference extension's protocol defines it); the route cache is cleared so
  a route matching on the header sees it;
- every body chunk held so far, and every later one: an empty ``CommonResponse`` (CONTINUE),
  so Envoy sends on the chunk it kept;
- or, when the picker refuses (no pod up, every pod full, an unknown model), an immediate
  response: 429/503/404 with ``Retry-After`` and corral's JSON error body.

When the picker cannot decide (it raised, or took longer than ``decide_timeout``): with
``fail_open`` the request goes to any discovered pod (round robin), else it is answered 503.
When the picker itself is down Envoy decides alone, by its filter's ``failure_mode_allow``:
true sends the request on without the header (so the gateway's route must then lead to the
pool some other way, e.g. a second route to a plain cluster of the pods), false answers 500.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import grpc
import structlog
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.struct_pb2 import Struct
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter

from corral.picker.bodies import MORE, BodyError, ModelSniffer
from corral.picker.decide import Decision
from corral.picker.picker import Picker

log = structlog.get_logger("corral.picker.extproc")

DESTINATION = "x-gateway-destination-endpoint"
LB_NAMESPACE = "envoy.lb"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name

_ERRORS = {404: ("invalid_request_error", "model_not_found"),
           429: ("rate_limit_error", "pool_full"),
           503: ("server_error", "no_pods")}


@dataclass
class _Stream:
    """One request's state while its headers wait for the model."""

    headers: dict[str, str]
    sniffer: ModelSniffer
    held: list[pb.HttpBody] = field(default_factory=list)   # chunks not yet passed on
    decided: bool = False


class ExtProcServer(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """``Process`` streams answered from ``picker``'s decisions."""

    def __init__(self, picker: Picker, *, fail_open: bool = True,
                 decide_timeout: float = 5.0, registry: CollectorRegistry | None = None) -> None:
        self.picker = picker
        self.fail_open = fail_open
        self.decide_timeout = decide_timeout
        self._round_robin = itertools.count()
        registry = registry if registry is not None else picker.registry
        self.undecided = Counter(
            "corral_picker_undecided", "Requests the picker could not decide, by what followed",
            ["outcome"], registry=registry)
        for outcome in ("fail_open", "fail_closed"):
            self.undecided.labels(outcome)

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest],  # noqa: N802
                      context: object) -> AsyncIterator[pb.ProcessingResponse]:
        """One request: headers, then body chunks (and trailers), as Envoy streams them."""
        stream: _Stream | None = None
        async for message in request_iterator:
            kind = message.WhichOneof("request")
            if kind == "request_headers":
                stream = _Stream(_header_map(message.request_headers.headers), ModelSniffer())
                if message.request_headers.end_of_stream:     # no body: GET /v1/models
                    stream.decided = True
                    yield await self._answer(None, stream)
            elif kind == "request_body" and stream is not None:
                if stream.decided:
                    yield _pass_on()
                    continue
                stream.held.append(message.request_body)
                try:
                    found = stream.sniffer.feed(message.request_body.body,
                                                message.request_body.end_of_stream)
                except BodyError:
                    found = None    # not JSON: any pod answers it with its own error
                if found is MORE:
                    continue
                async for answer in self._decided(found if isinstance(found, str) else None,
                                                  stream):
                    yield answer
            elif kind == "request_trailers" and stream is not None:
                if not stream.decided:      # the body ended (before trailers) without a model
                    async for answer in self._decided(None, stream):
                        yield answer
                yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())

    async def _decided(self, model: str | None,
                       stream: _Stream) -> AsyncIterator[pb.ProcessingResponse]:
        """The headers' answer, then the chunks held until now, unchanged."""
        stream.decided = True
        answer = await self._answer(model, stream)
        yield answer
        if answer.WhichOneof("response") == "immediate_response":
            return
        for _ in stream.held:    # one answer per chunk, in order
            yield _pass_on()
        stream.held.clear()

    async def _answer(self, model: str | None, stream: _Stream) -> pb.ProcessingResponse:
        decision = await self._decide(model, stream.headers)
        if not decision.endpoints:
            log.info("picker_refused", model=model, reason=decision.reason,
                     status=decision.status)
            return _refusal(decision, model)
        if model is not None:
            self.picker.note_sent(decision.endpoints[0], model)
        log.debug("picker_picked", model=model, reason=decision.reason,
                  endpoint=decision.endpoints[0])
        return _destination(decision.endpoints)

    async def _decide(self, model: str | None, headers: Mapping[str, str]) -> Decision:
        try:
            async with asyncio.timeout(self.decide_timeout):
                return await self.picker.pick(model, headers)
        except Exception as exc:    # the request must get an answer whatever went wrong
            log.warning("picker_undecided", model=model, error=repr(exc),
                        fail_open=self.fail_open)
        pods = self.picker.discovery.endpoints()
        if self.fail_open and pods:
            self.undecided.labels("fail_open").inc()
            start = next(self._round_robin) % len(pods)
            return Decision(tuple(pods[start:] + pods[:start]), "fail_open")
        self.undecided.labels("fail_closed").inc()
        return Decision((), "fail_closed", status=503, retry_after=self.picker.retry_after)


def _header_map(headers: object) -> dict[str, str]:
    result: dict[str, str] = {}
    for header in getattr(headers, "headers", ()):
        value = header.raw_value.decode("latin-1") if header.raw_value else header.value
        result[header.key.lower()] = value
    return result


def _pass_on() -> pb.ProcessingResponse:
    """CONTINUE for one chunk (STREAMED mode: Envoy holds the chunk and sends it on as it is)."""
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse()))


def _destination(endpoints: tuple[str, ...]) -> pb.ProcessingResponse:
    mutation = pb.HeaderMutation(set_headers=[HeaderValueOption(
        header=HeaderValue(key=DESTINATION, raw_value=endpoints[0].encode()),
        append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)])
    metadata = Struct()
    metadata.update({LB_NAMESPACE: {DESTINATION: ",".join(endpoints)}})
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(response=pb.CommonResponse(
            header_mutation=mutation, clear_route_cache=True)),
        dynamic_metadata=metadata)


def _refusal(decision: Decision, model: str | None) -> pb.ProcessingResponse:
    status = decision.status or 503
    type_, code = _ERRORS.get(status, ("server_error", decision.reason))
    message = {"unknown_model": f"no pod serves a model named {model!r}",
               "full": f"every pod that could serve {model!r} is full; retry later",
               }.get(decision.reason, "no corral pod can take the request now")
    body = json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()
    headers = [HeaderValueOption(header=HeaderValue(key="content-type",
                                                    raw_value=b"application/json"))]
    if decision.retry_after is not None:
        seconds = str(max(1, math.ceil(decision.retry_after))).encode()
        headers.append(HeaderValueOption(header=HeaderValue(key="retry-after",
                                                            raw_value=seconds)))
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=HttpStatus(code=status),
        headers=pb.HeaderMutation(set_headers=headers), body=body,
        details=f"corral_picker_{decision.reason}"))


async def start_grpc(server: ExtProcServer, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Serve ``server`` and gRPC health checks on host:port; returns the server and its port."""
    grpc_server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(server, grpc_server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, grpc_server)
    bound = grpc_server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    await grpc_server.start()
    for name in ("", SERVICE_NAME):
        await checks.set(name, health_pb2.HealthCheckResponse.SERVING)
    return grpc_server, bound
