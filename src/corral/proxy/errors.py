"""OpenAI-shaped error responses, and the one mapping from corral's errors to HTTP statuses."""

from __future__ import annotations

import json
import math

from starlette.responses import Response

from corral.errors import (
    AuthenticationError,
    ClientGoneError,
    CorralError,
    ModelLoadError,
    ModelNotFoundError,
    ModelUnavailableError,
    PermissionDeniedError,
    QueueFullError,
    QueueTimeoutError,
    RequestTimeoutError,
    RequestTooLargeError,
    ShuttingDownError,
    UpstreamError,
    UpstreamTimeoutError,
)

# nginx's "client closed request": logged and counted, never read by anyone.
CLIENT_CLOSED_REQUEST = 499


class BadRequestError(CorralError):
    """The client sent something corral cannot route (the proxy's own 4xx errors)."""

    def __init__(self, message: str, code: str = "invalid_request", status: int = 400) -> None:
        self.code = code
        self.status = status
        super().__init__(message)


def error_body(message: str, type_: str, code: str | None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()


def error_response(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    code: str | None = None,
    retry_after: float | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """``{"error": {"message", "type", "code"}}`` with ``status`` (and ``Retry-After``)."""
    all_headers = dict(headers or {})
    if retry_after is not None:
        all_headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return Response(
        error_body(message, type_, code),
        status_code=status,
        headers=all_headers,
        media_type="application/json",
    )


def response_for(exc: CorralError, headers: dict[str, str] | None = None) -> Response:
    """The HTTP answer for one of corral's errors."""
    if isinstance(exc, BadRequestError):
        return error_response(exc.status, str(exc), code=exc.code, headers=headers)
    if isinstance(exc, AuthenticationError):
        return error_response(401, str(exc), type_="authentication_error",
                              code="invalid_api_key",
                              headers={**(headers or {}), "WWW-Authenticate": "Bearer"})
    if isinstance(exc, PermissionDeniedError):
        return error_response(403, str(exc), type_="permission_error", code="forbidden",
                              headers=headers)
    if isinstance(exc, ModelNotFoundError):
        return error_response(404, str(exc), code="model_not_found", headers=headers)
    if isinstance(exc, ModelLoadError):
        return error_response(503, str(exc), type_="service_unavailable",
                              code="model_load_failed", retry_after=exc.retry_after,
                              headers=headers)
    if isinstance(exc, ModelUnavailableError):
        return error_response(503, str(exc), type_="service_unavailable",
                              code="model_unavailable", retry_after=exc.retry_after,
                              headers=headers)
    if isinstance(exc, QueueFullError):
        return error_response(429, str(exc), type_="rate_limit_error", code="queue_full",
                              retry_after=exc.retry_after, headers=headers)
    if isinstance(exc, QueueTimeoutError):
        return error_response(503, str(exc), type_="service_unavailable", code="queue_timeout",
                              retry_after=exc.retry_after, headers=headers)
    if isinstance(exc, ShuttingDownError):
        return error_response(503, str(exc), type_="service_unavailable", code="shutting_down",
                              retry_after=5.0, headers=headers)
    if isinstance(exc, RequestTooLargeError):
        return error_response(413, str(exc), code="request_too_large", headers=headers)
    if isinstance(exc, RequestTimeoutError):
        return error_response(408, str(exc), code="request_timeout", headers=headers)
    if isinstance(exc, ClientGoneError):
        return error_response(CLIENT_CLOSED_REQUEST, str(exc), code="client_closed_request",
                              headers=headers)
    if isinstance(exc, UpstreamTimeoutError):
        return error_response(504, str(exc), type_="server_error", code="upstream_timeout",
                              headers=headers)
    if isinstance(exc, UpstreamError):
        return error_response(502, str(exc), type_="server_error", code="upstream_failed",
                              headers=headers)
    return error_response(500, str(exc), type_="server_error", code="internal_error",
                          headers=headers)
