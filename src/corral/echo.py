"""Quoting what a client sent, bounded in size.

A client controls model names, paths and header values; an error message or a log line that
repeats them whole lets it turn a 15 MiB ``model`` into a 15 MiB answer and log line. Every
echo goes through here: up to ``ECHO_LIMIT`` characters, then an ellipsis and the original
length.

Usage::

    f"model {quote(name)} does not exist"   # 'aaaa…' (15728640 characters)
    log.info("request", path=clip(path))
"""

from __future__ import annotations

ECHO_LIMIT = 200


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` itself if it is short; else its first ``limit`` characters, an ellipsis and
    its length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def quote(text: str, limit: int = ECHO_LIMIT) -> str:
    """``repr(text)`` if it is short; else the repr of its start with an ellipsis, and its
    length."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit] + '…'!r} ({len(text)} characters)"
