"""Every error corral raises on purpose, in one hierarchy, each with its HTTP answer.

``CorralError`` is the root; catch it to handle anything corral means to report. Each error
class says how it is answered over HTTP in three class attributes, which an instance may
override: ``status`` (the HTTP status), ``type`` and ``code`` (the ``error`` object's fields);
``retry_after`` (seconds, for ``Retry-After``) and ``headers`` (extra response headers) where
they apply. ``corral.proxy.errors.response_for`` turns any of them into the response in one
lookup; a class without its own values answers 500 ``server_error``/``internal_error``.

- ``ConfigError`` (400 ``invalid_config``): the YAML file is invalid; ``.problems`` lists
  ``key.path: message`` lines. ``ReloadRefusedError`` (400 ``reload_refused``): a valid file
  that a reload cannot apply (a setting only read at start-up changed, or the address corral
  listens on would be left without keys); the running configuration stays.
- ``BadRequestError`` (400 ``invalid_request``, status and code per instance): a request corral
  cannot route or take (a body that is no JSON object, a missing ``model``, a content type
  that is not JSON: 415). ``HostNotAllowedError`` (421 ``host_not_allowed``): a ``Host`` header
  that is not one of corral's names (DNS rebinding).
- ``ModelNotFoundError`` (404 ``model_not_found``): a request named a model that is not
  configured, or one its key may not use (the two are answered alike).
- ``ModelLoadError`` (503 ``model_load_failed``): a child llama-server could not be started or
  made ready; ``.retry_after`` says when trying again makes sense, ``.log_tail`` what the child
  printed last.
- ``ModelUnavailableError`` (503 ``model_unavailable``): the model exists but is stopping or
  being unloaded, or a reload removed it while the request waited.
- ``ModelDownloadingError`` (503 ``model_downloading``): its files are still downloading; the
  message carries the progress. ``DownloadError`` (503 ``model_download_failed``): its files
  could not be fetched or verified (a missing or gated repository, a checksum mismatch, too
  little disk space, offline without a cached copy); it becomes the model's failed load.
- ``CapacityError`` (503 ``insufficient_memory``): a reservation does not fit the ledger;
  ``NoFit``: no layout of a model fits at all. Both become a ``ModelLoadError`` before a client
  sees them; ``corral.placement`` re-exports them.
- ``UpstreamError`` (502 ``upstream_failed``): a ready child failed mid-request (connection
  refused or reset); ``UpstreamTimeoutError`` (504 ``upstream_timeout``): it did not finish a
  non-streamed answer within ``upstream.generation_timeout``.
- ``QueueFullError`` (429 ``queue_full``) / ``QueueTimeoutError`` (503 ``queue_timeout``):
  admission refused a request.
- ``ClientGoneError`` (499 ``client_closed_request``): the client left while its request was
  read, queued or prepared; logged and counted, read by nobody.
- ``AuthenticationError`` (401 ``invalid_api_key``) / ``PermissionDeniedError`` (403
  ``forbidden``): no valid API key / a key without the scope. Their messages never contain a
  key. ``CrossSiteRequestError`` (403 ``cross_site_request``): a request a web page of another
  site made (its ``Origin`` is not allowed, or ``Sec-Fetch-Site`` says cross-site).
- ``ShuttingDownError`` (503 ``shutting_down``): corral is draining on SIGTERM.
- ``RequestTooLargeError`` / ``RequestTimeoutError``: body over ``limits.max_body`` (413) or
  not sent within ``limits.body_timeout`` (408).
- Not answered over HTTP (500 if they ever were): ``UnsafeDirectoryError``, the children's
  socket directory is not private to corral's user (``corral serve`` exits 1);
  ``AlreadyRunningError``, another corral holds
  the lock of the same state file, so this one must not start (it would kill that one's
  children as leftovers), ``.owner`` is its pid; ``InvalidTransition``, a bug, a model state
  change the state machine forbids (``corral.supervisor.state`` re-exports it);
  ``StatusError``, ``corral ps`` could not read a corral's status (``corral.ps`` re-exports it).

Messages quote what a client sent only through ``corral.echo``, bounded in size.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Protocol

from corral.echo import quote


class Shortfall(Protocol):
    """One device that cannot take a reservation (``corral.placement.ledger.Shortfall``)."""

    def describe(self) -> str: ...

# nginx's "client closed request": logged and counted, never read by anyone.
CLIENT_CLOSED_REQUEST = 499


class CorralError(Exception):
    """Base class of every error corral raises deliberately, with its HTTP answer."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"
    retry_after: float | None = None  # seconds, sent as Retry-After
    headers: Mapping[str, str] = MappingProxyType({})


class BadRequestError(CorralError):
    """The client sent something corral cannot route or take (the proxy's own 4xx errors)."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"

    def __init__(self, message: str, code: str = "invalid_request", status: int = 400) -> None:
        self.code = code
        self.status = status
        super().__init__(message)


class HostNotAllowedError(BadRequestError):
    """The ``Host`` header names none of corral's hosts (``allowed_hosts``): DNS rebinding."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="host_not_allowed", status=421)


class ConfigError(CorralError):
    """The configuration file cannot be used; ``problems`` has one line per mistake."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_config"
    headline = "invalid configuration"

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{self.headline} {source}:\n{lines}")


class ReloadRefusedError(ConfigError):
    """A reload that would change what only a restart can, or open corral without keys."""

    code = "reload_refused"
    headline = "cannot reload (the running configuration stays)"


class ModelNotFoundError(CorralError):
    """A request named a model (or alias) that the configuration does not have, or that its
    key may not use: ``available`` lists only what it may."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, name: str, available: Sequence[str]) -> None:
        self.name = name
        self.available = list(available)
        names = ", ".join(self.available) or "(none)"
        super().__init__(f"model {quote(name)} does not exist; available models: {names}")


class ModelLoadError(CorralError):
    """A model could not be loaded; the message carries llama-server's own last lines."""

    status = 503
    type = "service_unavailable"
    code = "model_load_failed"
    retry_after: float = 1.0

    def __init__(
        self, model: str, reason: str, log_tail: Sequence[str] = (), retry_after: float = 1.0,
        *, pressure: bool = False,
    ) -> None:
        self.model = model
        self.reason = reason
        self.log_tail = list(log_tail)
        self.retry_after = retry_after
        # The host ran short (file descriptors, processes, memory) rather than the model
        # failing: not counted towards giving up on it.
        self.pressure = pressure
        message = f"model {model!r} could not be loaded: {reason}"
        if self.log_tail:
            message += "\nlast lines from llama-server:\n" + "\n".join(self.log_tail)
        super().__init__(message)


class ModelUnavailableError(CorralError):
    """The model exists but cannot take requests now (it is being unloaded or shut down)."""

    status = 503
    type = "service_unavailable"
    code = "model_unavailable"
    retry_after: float = 1.0

    def __init__(self, model: str, reason: str, retry_after: float = 1.0) -> None:
        self.model = model
        self.retry_after = retry_after
        super().__init__(f"model {model!r} is unavailable: {reason}")

    @classmethod
    def removed(cls, model: str) -> ModelUnavailableError:
        """For a request that was waiting for a model a reload removed."""
        return cls(model, "it was removed from the configuration by a reload", 5.0)


class ModelDownloadingError(ModelUnavailableError):
    """The model's files are being downloaded: the answer carries the progress so far."""

    code = "model_downloading"

    def __init__(self, model: str, progress: str, retry_after: float = 5.0) -> None:
        super().__init__(model, f"its files are downloading ({progress}); try again later",
                         retry_after)
        self.progress = progress


class DownloadError(CorralError):
    """A model's files could not be fetched or verified (``what``: the source or file)."""

    status = 503
    type = "service_unavailable"
    code = "model_download_failed"
    retry_after: float = 5.0

    def __init__(self, what: str, reason: str, retry_after: float = 5.0) -> None:
        self.what = what
        self.reason = f"{what}: {reason}"
        self.retry_after = retry_after
        super().__init__(self.reason)


class UpstreamError(CorralError):
    """A child llama-server failed while serving a request."""

    status = 502
    code = "upstream_failed"

    def __init__(
        self, model: str, reason: str, *, delivered: bool = True, refused: bool = False
    ) -> None:
        self.model = model
        # delivered=False: the child produced nothing for the request; refused=True: it never
        # even accepted the connection.
        self.delivered = delivered
        self.refused = refused
        super().__init__(f"model {model!r} failed while serving the request: {reason}")


class UpstreamTimeoutError(UpstreamError):
    """A child did not finish a non-streamed answer within ``upstream.generation_timeout``."""

    status = 504
    code = "upstream_timeout"

    def __init__(self, model: str, seconds: float) -> None:
        super().__init__(model, f"no answer within upstream.generation_timeout ({seconds:g}s)")


class QueueFullError(CorralError):
    """A model's admission queue is full; the client should retry later (429)."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"
    retry_after: float = 1.0

    def __init__(self, model: str, limit: int, retry_after: float = 1.0) -> None:
        self.model = model
        self.retry_after = retry_after
        super().__init__(
            f"model {model!r} is busy: all slots are in use and {limit} requests already wait"
        )


class QueueTimeoutError(CorralError):
    """A request waited for a slot longer than the queue timeout (503)."""

    status = 503
    type = "service_unavailable"
    code = "queue_timeout"
    retry_after: float = 1.0

    def __init__(self, model: str, waited: float, retry_after: float = 1.0) -> None:
        self.model = model
        self.retry_after = retry_after
        super().__init__(f"model {model!r} had no free slot within {waited:g}s")


class ClientGoneError(CorralError):
    """The client disconnected before its request was sent upstream; nobody reads the answer."""

    status = CLIENT_CLOSED_REQUEST
    type = "invalid_request_error"
    code = "client_closed_request"


class AuthenticationError(CorralError):
    """No valid API key was presented (401)."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"
    headers = MappingProxyType({"WWW-Authenticate": "Bearer"})


class PermissionDeniedError(CorralError):
    """The key is valid but may not use this endpoint (403)."""

    status = 403
    type = "permission_error"
    code = "forbidden"


class CrossSiteRequestError(PermissionDeniedError):
    """A web page of another site made the request: its ``Origin`` is not allowed (``cors``),
    or the browser says it is cross-site (``Sec-Fetch-Site``)."""

    code = "cross_site_request"


class ShuttingDownError(CorralError):
    """corral is draining before it exits: new requests are refused (503)."""

    status = 503
    type = "service_unavailable"
    code = "shutting_down"
    retry_after = 5.0


class UnsafeDirectoryError(CorralError):
    """The directory for the children's sockets is not private to corral's user (another user
    owns it, it is a link, or others may enter it): someone may have prepared it to take a
    child's socket, so corral does not start."""


class AlreadyRunningError(CorralError):
    """Another corral holds the lock beside the state file; ``owner`` is its pid if known."""

    def __init__(self, state_file: str, lock_file: str, owner: int | None) -> None:
        self.state_file = state_file
        self.lock_file = lock_file
        self.owner = owner
        who = "another corral" if owner is None else f"another corral (pid {owner})"
        super().__init__(
            f"{who} is running with the state file {state_file} (it holds {lock_file}); "
            "stop it first, or give this one its own state_file or listen.port"
        )


class RequestTooLargeError(CorralError):
    """The request body exceeds ``limits.max_body`` (413)."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeoutError(CorralError):
    """The client did not send its body within ``limits.body_timeout`` (408)."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class CapacityError(CorralError):
    """A reservation does not fit; ``shortfalls`` says where and by how much."""

    status = 503
    type = "service_unavailable"
    code = "insufficient_memory"

    def __init__(self, owner: str, shortfalls: Sequence[Shortfall], note: str = "") -> None:
        self.owner = owner
        self.shortfalls = list(shortfalls)
        details = "; ".join(s.describe() for s in self.shortfalls)
        super().__init__(f"not enough memory for {owner!r}: {details}{note}")


class NoFit(CapacityError):
    """No layout fits. ``needed`` is the most promising layout's reservation (pass it to
    ``choose_evictions``); ``impossible`` is True when evicting every model would not make it
    fit, ``permanent`` when it would not fit even once other programs free their memory too."""

    def __init__(
        self, name: str, shortfalls: Sequence[Shortfall], needed: Mapping[str, int],
        impossible: bool, permanent: bool | None = None,
    ) -> None:
        permanent = impossible if permanent is None else permanent and impossible
        if permanent:
            note = " (more than these devices can hold even when idle)"
        elif impossible:
            note = " (other programs use the rest: it fits once they free it)"
        else:
            note = ""
        super().__init__(name, shortfalls, note)
        self.needed = dict(needed)
        self.impossible = impossible
        self.permanent = permanent


class InvalidTransition(CorralError):
    """A bug: code tried a model state change the state machine does not allow."""


class StatusError(CorralError):
    """``corral ps`` could not read ``/admin/status``; the message says why and what to do
    (never the key)."""

def out_of_files(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is the process or the system running out of file
    descriptors: a passing shortage to answer with 503, never a fault of corral's or a child's."""
    seen: BaseException | None = exc
    for _ in range(8):  # causes chain: httpx -> httpcore -> OSError
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in (errno.EMFILE, errno.ENFILE):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
