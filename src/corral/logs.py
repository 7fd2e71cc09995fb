"""structlog set-up: JSON lines when not on a terminal, readable colums on one.

Every event carries what it is about as keys (``model``, ``pid``, ``request_id``); request-scoped
keys are bound with ``structlog.contextvars`` so that code below the proxy need not pass them.

Lines from the standard library's ``logging`` (uvicorn, asyncio, httpx, corral's own modules that
use it) go through structlog's ``ProcessorFormatter`` with the same processors and renderer, so
stderr holds one format only: a log shipper that reads JSON never meets a plain-text line.
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog and ``logging`` for the process; ``json`` defaults to "stderr is
    not a terminal"."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    ))
    root = logging.getLogger()
    root.handlers = [handler]
    # Libraries' info lines (httpx logs every request it sends) are noise at corral's info.
    root.setLevel(max(_LEVELS[level], logging.WARNING))
    logging.getLogger("corral").setLevel(_LEVELS[level])
    logging.captureWarnings(True)  # warnings.warn() lines too
    # "Exception ignored in ..." (a finalizer that failed: uvloop prints one for a child that
    # could not be spawned) would otherwise be written to stderr as plain text.
    sys.unraisablehook = _log_unraisable


def _log_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    exc = unraisable.exc_value
    logging.getLogger("corral.unraisable").error(
        "%s: %s", unraisable.err_msg or "Exception ignored in", unraisable.object,
        exc_info=(unraisable.exc_type, exc, unraisable.exc_traceback) if exc else None)
