"""Every error corral raises on purpose, in one hierarchy.

``CorralError`` is the root; catch it to handle anything corral means to report. Each child says
which part failed and carries what a user needs to act on it:

- ``ConfigError``: the YAML file is invalid; ``.problems`` lists ``key.path: message`` lines.
  ``ReloadRefusedError``: a valid file that a reload cannot apply (a setting only read at
  start-up changed, or the address corral listens on would be left without keys); the running
  configuration stays.
- ``ModelNotFoundError``: a request named a model that is not configured.
- ``ModelLoadError``: a child llama-server could not be started or made ready; ``.retry_after``
  says when trying again makes sense, ``.log_tail`` what the child printed last.
- ``ModelUnavailableError``: the model exists but is stopping or being unloaded, or a
  reload removed it while the request waited.
- ``UpstreamError``: a ready child failed mid-request (connection refused or reset);
  ``UpstreamTimeoutError``: it did not finish a non-streamed answer within
  ``upstream.generation_timeout`` (504).
- ``QueueFullError`` / ``QueueTimeoutError``: admission refused a request (429 / 503).
- ``ClientGoneError``: the client left while its request was queued.
- ``AuthenticationError`` / ``PermissionDeniedError``: no valid API key (401) / a key without
  the scope or model (403). Their messages never contain a key.
- ``ShuttingDownError``: corral is draining on SIGTERM (503).
- ``AlreadyRunningError``: another corral holds the lock of the same state file, so this one
  must not start (it would kill that one's children as leftovers); ``.owner`` is its pid.
- ``RequestTooLargeError`` / ``RequestTimeoutError``: body over ``limits.max_body`` (413) or
  not sent within ``limits.body_timeout`` (408).

The proxy maps each to an HTTP status in one place (``corral.proxy.errors``).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence


class CorralError(Exception):
    """Base class of every error corral raises deliberately."""


class ConfigError(CorralError):
    """The configuration file cannot be used; ``problems`` has one line per mistake."""

    headline = "invalid configuration"

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{self.headline} {source}:\n{lines}")


class ReloadRefusedError(ConfigError):
    """A reload that would change what only a restart can, or open corral without keys."""

    headline = "cannot reload (the running configuration stays)"


class ModelNotFoundError(CorralError):
    """A request named a model (or alias) that the configuration does not have."""

    def __init__(self, name: str, available: Sequence[str]) -> None:
        self.name = name
        self.available = list(available)
        names = ", ".join(self.available) or "(none)"
        super().__init__(f"model {name!r} does not exist; available models: {names}")


class ModelLoadError(CorralError):
    """A model could not be loaded; the message carries llama-server's own last lines."""

    def __init__(
        self, model: str, reason: str, log_tail: Sequence[str] = (), retry_after: float = 1.0
    ) -> None:
        self.model = model
        self.reason = reason
        self.log_tail = list(log_tail)
        self.retry_after = retry_after
        message = f"model {model!r} could not be loaded: {reason}"
        if self.log_tail:
            message += "\nlast lines from llama-server:\n" + "\n".join(self.log_tail)
        super().__init__(message)


class ModelUnavailableError(CorralError):
    """The model exists but cannot take requests now (it is being unloaded or shut down)."""

    def __init__(self, model: str, reason: str, retry_after: float = 1.0) -> None:
        self.model = model
        self.retry_after = retry_after
        super().__init__(f"model {model!r} is unavailable: {reason}")

    @classmethod
    def removed(cls, model: str) -> ModelUnavailableError:
        """For a request that was waiting for a model a reload removed."""
        return cls(model, "it was removed from the configuration by a reload", 5.0)


class UpstreamError(CorralError):
    """A child llama-server failed while serving a request."""

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

    def __init__(self, model: str, seconds: float) -> None:
        super().__init__(model, f"no answer within upstream.generation_timeout ({seconds:g}s)")


class QueueFullError(CorralError):
    """A model's admission queue is full; the client should retry later (429)."""

    def __init__(self, model: str, limit: int, retry_after: float = 1.0) -> None:
        self.model = model
        self.retry_after = retry_after
        super().__init__(
            f"model {model!r} is busy: all slots are in use and {limit} requests already wait"
        )


class QueueTimeoutError(CorralError):
    """A request waited for a slot longer than the queue timeout (503)."""

    def __init__(self, model: str, waited: float, retry_after: float = 1.0) -> None:
        self.model = model
        self.retry_after = retry_after
        super().__init__(f"model {model!r} had no free slot within {waited:g}s")


class ClientGoneError(CorralError):
    """The client disconnected before its request was sent upstream; nobody reads the answer."""


class AuthenticationError(CorralError):
    """No valid API key was presented (401)."""


class PermissionDeniedError(CorralError):
    """The key is valid but may not use this model or endpoint (403)."""


class ShuttingDownError(CorralError):
    """corral is draining before it exits: new requests are refused (503)."""


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


class RequestTimeoutError(CorralError):
    """The client did not send its body within ``limits.body_timeout`` (408)."""


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
