"""OpenAI-shaped error responses: each of corral's errors carries its own status, type and
code (``corral.errors``), so turning one into its answer is one lookup."""

from __future__ import annotations

import json
import math

from starlette.responses import Response

from corral.errors import CLIENT_CLOSED_REQUEST, BadRequestError, CorralError

__all__ = ["CLIENT_CLOSED_REQUEST", "BadRequestError", "error_body", "error_response",
           "response_for"]


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
    """The HTTP answer for one of corral's errors, as the error itself describes it."""
    return error_response(exc.status, str(exc), type_=exc.type, code=exc.code,
                          retry_after=exc.retry_after, headers={**(headers or {}), **exc.headers})
