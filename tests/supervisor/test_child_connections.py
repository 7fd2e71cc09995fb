"""The model-request client against the real llama-server: a request sent right after a
streamed answer must reach the child, not a connection the child is closing."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import httpx
import pytest

from corral.proxy.forward import send_upstream
from corral.supervisor.childhttp import ChildSession

pytestmark = pytest.mark.integration


async def ask(session: ChildSession, stream: bool) -> tuple[int, bytes]:
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                       "stream": stream}).encode()
    response = await send_upstream(session, "m", "POST", "/v1/chat/completions", b"",
                                   [(b"content-type", b"application/json")], body)
    try:
        return response.status_code, await response.aread()
    finally:
        await response.aclose()


async def test_a_request_after_a_streamed_answer_reaches_the_child(
    llama_server: str, smollm2: Path, tmp_path: Path
) -> None:
    # llama-server ends the connection after each streamed answer (keep-alive offered or not):
    # measured without corral's care, every request sent at once on it failed.
    socket = str(tmp_path / "child.sock")
    child = subprocess.Popen(
        [llama_server, "-m", str(smollm2), "--host", socket, "--api-key", "key", "-np", "1",
         "-c", "512"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    session = ChildSession(socket, "key", connect_timeout=5.0, read_timeout=120.0)
    probe = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=socket),
                              base_url="http://child")
    try:
        async def ready() -> bool:
            try:
                return (await probe.get("/health")).status_code == 200
            except httpx.TransportError:
                return False

        deadline = asyncio.get_running_loop().time() + 120
        while not await ready():
            assert child.poll() is None and asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        answers = []
        for _ in range(10):
            answers.append(await ask(session, stream=True))
            answers.append(await ask(session, stream=False))  # no UpstreamError: delivered
    finally:
        await session.aclose()
        await probe.aclose()
        child.kill()
        child.wait()
    assert [status for status, _ in answers] == [200] * 20
    assert all(body.endswith(b"data: [DONE]\n\n") for _, body in answers[::2])
    assert all(json.loads(body)["object"] == "chat.completion" for _, body in answers[1::2])
