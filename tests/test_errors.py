"""Every error carries its HTTP answer; the ones that lived elsewhere are the same classes."""

from __future__ import annotations

import json

import pytest

from corral import errors
from corral.errors import (
    AuthenticationError,
    BadRequestError,
    CapacityError,
    ClientGoneError,
    CorralError,
    CrossSiteRequestError,
    HostNotAllowedError,
    InvalidTransition,
    ModelLoadError,
    ModelNotFoundError,
    ModelUnavailableError,
    NoFit,
    PermissionDeniedError,
    QueueFullError,
    QueueTimeoutError,
    ReloadRefusedError,
    RequestTimeoutError,
    RequestTooLargeError,
    ShuttingDownError,
    StatusError,
    UpstreamError,
    UpstreamTimeoutError,
)
from corral.proxy.errors import response_for

# (error, status, type, code, Retry-After)
ANSWERS: list[tuple[CorralError, int, str, str, str | None]] = [
    (BadRequestError("bad"), 400, "invalid_request_error", "invalid_request", None),
    (BadRequestError("type", code="unsupported_media_type", status=415), 415,
     "invalid_request_error", "unsupported_media_type", None),
    (HostNotAllowedError("host"), 421, "invalid_request_error", "host_not_allowed", None),
    (errors.ConfigError("f", ["x: bad"]), 400, "invalid_request_error", "invalid_config", None),
    (ReloadRefusedError("f", ["listen: needs a restart"]), 400, "invalid_request_error",
     "reload_refused", None),
    (AuthenticationError("no key"), 401, "authentication_error", "invalid_api_key", None),
    (PermissionDeniedError("scope"), 403, "permission_error", "forbidden", None),
    (CrossSiteRequestError("page"), 403, "permission_error", "cross_site_request", None),
    (ModelNotFoundError("x", ["m"]), 404, "invalid_request_error", "model_not_found", None),
    (RequestTimeoutError("slow"), 408, "invalid_request_error", "request_timeout", None),
    (RequestTooLargeError("big"), 413, "invalid_request_error", "request_too_large", None),
    (QueueFullError("m", 4, retry_after=2.5), 429, "rate_limit_error", "queue_full", "3"),
    (ClientGoneError("gone"), 499, "invalid_request_error", "client_closed_request", None),
    (InvalidTransition("bug"), 500, "server_error", "internal_error", None),
    (UpstreamError("m", "reset"), 502, "server_error", "upstream_failed", None),
    (ModelLoadError("m", "exit 1", retry_after=30), 503, "service_unavailable",
     "model_load_failed", "30"),
    (ModelUnavailableError("m", "stopping"), 503, "service_unavailable", "model_unavailable",
     "1"),
    (QueueTimeoutError("m", 60), 503, "service_unavailable", "queue_timeout", "1"),
    (ShuttingDownError("bye"), 503, "service_unavailable", "shutting_down", "5"),
    (CapacityError("m", []), 503, "service_unavailable", "insufficient_memory", None),
    (NoFit("m", [], {}, impossible=True), 503, "service_unavailable", "insufficient_memory",
     None),
    (UpstreamTimeoutError("m", 60), 504, "server_error", "upstream_timeout", None),
]


@pytest.mark.parametrize(("error", "status", "type_", "code", "retry_after"), ANSWERS,
                         ids=[type(a[0]).__name__ + str(a[1]) for a in ANSWERS])
def test_each_error_is_answered_as_it_says(
    error: CorralError, status: int, type_: str, code: str, retry_after: str | None
) -> None:
    response = response_for(error, {"X-Request-Id": "r1"})
    assert response.status_code == status
    assert json.loads(bytes(response.body)) == {
        "error": {"message": str(error), "type": type_, "code": code}}
    assert response.headers.get("retry-after") == retry_after
    assert response.headers["x-request-id"] == "r1"


def test_a_401_asks_for_a_bearer_key() -> None:
    assert response_for(AuthenticationError("no")).headers["www-authenticate"] == "Bearer"
    assert "www-authenticate" not in response_for(PermissionDeniedError("no")).headers


def test_errors_defined_elsewhere_before_are_the_same_classes() -> None:
    from corral import ps
    from corral.placement import decide, ledger
    from corral.proxy import errors as proxy_errors
    from corral.supervisor import state

    assert decide.NoFit is NoFit and ledger.CapacityError is CapacityError
    assert state.InvalidTransition is InvalidTransition and ps.StatusError is StatusError
    assert proxy_errors.BadRequestError is BadRequestError
    for cls in (NoFit, CapacityError, InvalidTransition, StatusError, BadRequestError):
        assert issubclass(cls, CorralError)
