"""The ext_proc server's answers, over a real gRPC channel, with a stand-in picker: the
decisions themselves are ``decide``'s (tested on their own); here only how they become Envoy's
messages, and what happens when the picker cannot decide."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from corral.picker.decide import Decision
from corral.picker.extproc import DESTINATION, ExtProcServer, start_grpc


class StandInPicker:
    """What ExtProcServer uses of ``Picker``: a fixed decision, or an exception."""

    retry_after = 2.0

    def __init__(self, decision: Decision | Exception) -> None:
        self.decision = decision
        self.asked: list[str | None] = []
        self.sent: list[tuple[str, str]] = []
        self.registry = CollectorRegistry()
        self.discovery = self

    def endpoints(self) -> list[str]:
        return ["10.0.0.1:8080", "10.0.0.2:8080"]

    async def pick(self, model: str | None, headers: Mapping[str, str]) -> Decision:
        self.asked.append(model)
        if isinstance(self.decision, Exception):
            raise self.decision
        return self.decision

    def note_sent(self, endpoint: str, model: str) -> None:
        self.sent.append((endpoint, model))


def headers(end_of_stream: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(
        headers=HeaderMap(headers=[HeaderValue(key=":path", raw_value=b"/v1/chat/completions")]),
        end_of_stream=end_of_stream))


def body(chunk: bytes, end: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=chunk, end_of_stream=end))


async def exchange(picker: StandInPicker, messages: list[pb.ProcessingRequest],
                   fail_open: bool = True) -> list[pb.ProcessingResponse]:
    server, port = await start_grpc(ExtProcServer(picker, fail_open=fail_open),  # type: ignore[arg-type]
                                    "127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ExternalProcessorStub(channel)

            async def requests() -> AsyncIterator[pb.ProcessingRequest]:
                for message in messages:
                    yield message

            return [answer async for answer in stub.Process(requests())]
    finally:
        await server.stop(None)


def destination(answer: pb.ProcessingResponse) -> tuple[str, str]:
    header = answer.request_headers.response.header_mutation.set_headers[0].header
    fallback = answer.dynamic_metadata.fields["envoy.lb"].struct_value.fields[DESTINATION]
    return header.raw_value.decode(), fallback.string_value


def passed_on(answer: pb.ProcessingResponse) -> bool:
    """A body chunk's answer that lets Envoy send the chunk on unchanged (STREAMED mode)."""
    common = answer.request_body.response
    return (answer.WhichOneof("response") == "request_body"
            and common.status == pb.CommonResponse.CONTINUE
            and not common.HasField("body_mutation") and not common.HasField("header_mutation"))


async def test_the_model_split_across_chunks_routes_and_every_chunk_passes_unchanged() -> None:
    picker = StandInPicker(Decision(("10.0.0.2:8080", "10.0.0.1:8080"), "loaded_free"))
    chunks = [b'{"mod', b'el": "smol", "messages": [', b'{"role": "user"}]}']
    answers = await exchange(picker, [headers(), body(chunks[0]), body(chunks[1]),
                                      body(chunks[2], end=True)])
    assert picker.asked == ["smol"]
    assert destination(answers[0]) == ("10.0.0.2:8080", "10.0.0.2:8080,10.0.0.1:8080")
    assert answers[0].request_headers.response.clear_route_cache
    # One answer per chunk, in order, after the headers' answer.
    assert len(answers) == 4 and all(passed_on(a) for a in answers[1:])
    assert picker.sent == [("10.0.0.2:8080", "smol")]


async def test_a_request_without_a_body_is_decided_on_its_headers() -> None:
    picker = StandInPicker(Decision(("10.0.0.1:8080",), "no_model"))
    answers = await exchange(picker, [headers(end_of_stream=True)])
    assert picker.asked == [None] and len(answers) == 1
    assert destination(answers[0])[0] == "10.0.0.1:8080"


async def test_a_body_that_is_not_json_goes_to_any_pod_unchanged() -> None:
    picker = StandInPicker(Decision(("10.0.0.1:8080",), "no_model"))
    answers = await exchange(picker, [headers(), body(b"--boundary\r\n", end=True)])
    assert picker.asked == [None]
    assert len(answers) == 2 and passed_on(answers[1])


@pytest.mark.parametrize(("status", "code"), [(429, "pool_full"), (503, "no_pods"),
                                              (404, "model_not_found")])
async def test_a_refusal_is_an_immediate_response_in_corrals_error_shape(
        status: int, code: str) -> None:
    reason = {429: "full", 503: "no_pods", 404: "unknown_model"}[status]
    retry = None if status == 404 else 1.5
    picker = StandInPicker(Decision((), reason, status=status, retry_after=retry))
    answers = await exchange(picker, [headers(), body(b'{"model": "smol"}', end=True)])
    assert len(answers) == 1        # the body is not passed on: the request ends here
    immediate = answers[0].immediate_response
    assert immediate.status.code == status
    sent = {h.header.key: h.header.raw_value.decode() for h in immediate.headers.set_headers}
    assert sent.get("retry-after") == (None if retry is None else "2")
    assert sent["content-type"] == "application/json"
    error: dict[str, Any] = json.loads(immediate.body)["error"]
    assert error["code"] == code and error["message"]


@pytest.mark.parametrize("fail_open", [True, False])
async def test_a_picker_that_cannot_decide_fails_open_or_closed(fail_open: bool) -> None:
    picker = StandInPicker(RuntimeError("views broken"))
    answers = await exchange(picker, [headers(), body(b'{"model": "smol"}', end=True)],
                             fail_open=fail_open)
    if fail_open:
        assert destination(answers[0])[0] in picker.endpoints()
        assert len(answers) == 2 and passed_on(answers[1])
    else:
        assert answers[0].immediate_response.status.code == 503
    outcome = "fail_open" if fail_open else "fail_closed"
    assert picker.registry.get_sample_value("corral_picker_undecided_total",
                                            {"outcome": outcome}) == 1


async def test_grpc_health_says_serving() -> None:
    picker = StandInPicker(Decision((), "no_pods", status=503))
    server, port = await start_grpc(ExtProcServer(picker), "127.0.0.1", 0)  # type: ignore[arg-type]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
                answer = await stub.Check(health_pb2.HealthCheckRequest(service=service))
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(None)


def test_corral_picker_with_a_bad_config_exits_2(tmp_path: Any) -> None:
    import subprocess
    import sys

    path = tmp_path / "picker.yaml"
    path.write_text("pods: []\n")
    done = subprocess.run([sys.executable, "-m", "corral", "picker", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "pods" in done.stderr and "empty" in done.stderr
