"""Web pages cannot use a keyless corral: Host allow-list, origins, CORS, JSON for changes.

A browser lets any page send requests to 127.0.0.1; these tests send what such a page's
requests carry (``Origin``, ``Sec-Fetch-Site``, a form's body type, a rebound ``Host``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import CorralProcess

Start = Callable[..., CorralProcess]
EVIL = "https://evil.example"
PREFLIGHT = {"Access-Control-Request-Method": "POST"}

pytestmark = pytest.mark.integration


def keyless(smollm2: Path, **extra: Any) -> dict[str, Any]:
    return {"models": {"m": {"path": str(smollm2), "slots": 1, "ctx_per_slot": 256}}, **extra}


def ask() -> dict[str, Any]:
    return {"model": "m", "prompt": "Hi", "max_tokens": 2}


def refused(response: httpx.Response, status: int, code: str, hint: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and hint in error["message"]
    assert not cors_headers(response)


def cors_headers(response: httpx.Response) -> dict[str, list[str]]:
    return {k: response.headers.get_list(k) for k in response.headers
            if k.lower().startswith("access-control-")}


def test_pages_of_other_sites_can_neither_act_nor_read(corral: Start, smollm2: Path) -> None:
    server = corral(keyless(smollm2))
    page = {"Origin": EVIL}
    for method, path, body in (
        ("POST", "/admin/reload", None), ("POST", "/admin/models/m/load", None),
        ("POST", "/v1/completions", ask()), ("GET", "/v1/models", None),
        ("GET", "/admin/status", None), ("GET", "/props?model=m", None),
    ):
        answer = server.http.request(method, path, json=body, headers=page)
        refused(answer, 403, "cross_site_request", "cors.allow_origins")
    # A preflight from such a page is refused too, so its fetch() never goes out.
    refused(server.http.options("/v1/chat/completions", headers={**page, **PREFLIGHT}),
            403, "cross_site_request", "cors.allow_origins")
    # Navigations, images and scripts carry no Origin; the browser marks them cross-site.
    for site in ("cross-site", "same-site"):
        refused(server.http.get("/props?model=m", headers={"Sec-Fetch-Site": site}),
                403, "cross_site_request", "Sec-Fetch-Site")
    assert server.model("m")["state"] == "unloaded"  # GET /props would have loaded it
    assert "config_reloaded" not in server.log()
    assert "request_refused" in server.log()

    # Clients that are not browsers send no Origin; an address bar sends Sec-Fetch-Site: none.
    assert server.http.get("/v1/models").status_code == 200
    assert server.http.get("/v1/models", headers={"Sec-Fetch-Site": "none"}).status_code == 200
    own = {"Origin": server.url, "Sec-Fetch-Site": "same-origin"}
    assert server.http.get("/v1/models", headers=own).status_code == 200
    assert [m.id for m in server.openai().models.list()] == ["m"]
    assert server.http.post("/admin/reload").status_code == 200  # like `curl -X POST`


def test_an_html_form_cannot_trigger_admin_actions(corral: Start, smollm2: Path) -> None:
    server = corral(keyless(smollm2))
    # What a <form> (or a fetch() that needs no preflight) can send, even without an Origin
    # (older browsers, privacy extensions).
    for content_type, body in (
        ("application/x-www-form-urlencoded", "a=b"),
        ("multipart/form-data; boundary=x", "--x--\r\n"),
        ("text/plain", '{"model": "m"}'),
    ):
        for path in ("/admin/models/m/load", "/admin/reload", "/admin/models/m/unload"):
            answer = server.http.post(path, content=body, headers={"Content-Type": content_type})
            refused(answer, 415, "unsupported_media_type", "application/json")
    assert server.model("m")["state"] == "unloaded"
    assert "config_reloaded" not in server.log()
    # JSON, or no body at all, is what clients send.
    assert server.http.post("/admin/reload", json={}).status_code == 200
    assert server.http.post("/admin/reload").status_code == 200


def test_cors_is_corrals_own_policy(corral: Start, smollm2: Path) -> None:
    app = "http://localhost:3000"
    server = corral(keyless(smollm2, cors={"allow_origins": [app]}))
    preflight = server.http.options("/v1/chat/completions", headers={
        "Origin": app, **PREFLIGHT,
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
        "Access-Control-Request-Private-Network": "true",
    })
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == app
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert preflight.headers["access-control-allow-headers"] == (
        "authorization, content-type, x-stainless-os")
    assert preflight.headers["access-control-allow-private-network"] == "true"

    # Through a child, which adds CORS headers of its own: only corral's come back.
    answer = server.http.post("/v1/completions", json=ask(), headers={"Origin": app})
    assert answer.status_code == 200, answer.text
    assert cors_headers(answer)["access-control-allow-origin"] == [app]
    assert "x-request-id" in answer.headers["access-control-expose-headers"].lower()
    # Its page reads corral's errors too, a form-typed body's 415 included.
    typed = server.http.post("/admin/reload", content="a=b", headers={
        "Origin": app, "Content-Type": "application/x-www-form-urlencoded"})
    assert typed.status_code == 415 and cors_headers(typed)["access-control-allow-origin"] == [
        app]
    plain = server.http.post("/v1/completions", json=ask())
    assert plain.status_code == 200 and not cors_headers(plain)
    # An origin not listed gets nothing, not even through the child.
    refused(server.http.post("/v1/completions", json=ask(),
                             headers={"Origin": "http://localhost:4000"}),
            403, "cross_site_request", "'http://localhost:4000'")


def test_any_origin_when_configured(corral: Start, smollm2: Path) -> None:
    server = corral(keyless(smollm2, cors={"allow_origins": ["*"]}))
    answer = server.http.post("/v1/completions", json=ask(), headers={"Origin": EVIL})
    assert answer.status_code == 200, answer.text
    assert cors_headers(answer)["access-control-allow-origin"] == ["*"]


def test_dns_rebinding_is_refused(corral: Start, smollm2: Path) -> None:
    server = corral(keyless(smollm2))
    port = server.port
    rebound = {"Host": f"rebind.example:{port}"}
    refused(server.http.get("/admin/status", headers=rebound), 421, "host_not_allowed",
            "allowed_hosts")
    refused(server.http.post("/admin/reload", headers=rebound), 421, "host_not_allowed",
            "allowed_hosts")
    refused(server.http.get("/metrics", headers={"Host": f"corral:{port}"}), 421,
            "host_not_allowed", "'corral:")
    assert "config_reloaded" not in server.log()
    # What clients send for corral's own address (the tests' httpx: 127.0.0.1:PORT).
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost:{port}", f"[::1]:{port}",
                 "127.0.0.1", f"10.1.2.3:{port}"):
        assert server.http.get("/admin/status", headers={"Host": host}).status_code == 200, host

    # Names are added in allowed_hosts (a reload applies them), "*" lets any through.
    config = yaml.safe_load(server.config_path.read_text())
    config["allowed_hosts"] = ["corral", ".example"]
    server.config_path.write_text(yaml.safe_dump(config))
    assert server.http.post("/admin/reload").status_code == 200
    assert server.http.get("/metrics", headers={"Host": f"corral:{port}"}).status_code == 200
    assert server.http.get("/admin/status", headers=rebound).status_code == 200
    refused(server.http.get("/admin/status", headers={"Host": "example.com"}), 421,
            "host_not_allowed", "allowed_hosts")
    config["allowed_hosts"] = ["*"]
    server.config_path.write_text(yaml.safe_dump(config))
    assert server.http.post("/admin/reload").status_code == 200
    assert server.http.get("/admin/status", headers={"Host": "example.com"}).status_code == 200
