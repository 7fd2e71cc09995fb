"""Human-friendly durations (``90s``, ``10m``, ``1h30m``) and sizes (``512MiB``, ``24GiB``).

Both parse through well-kept libraries: ``pytimeparse`` for durations and pydantic's ``ByteSize``
for sizes. A bare number is seconds or bytes. Both validate to plain numbers so the rest of corral
never sees a string.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, ByteSize
from pytimeparse.timeparse import timeparse as parse_timespan

_BAD_DURATION = "not a duration (use e.g. 90s, 10m, 1h)"


def parse_duration(value: Any) -> float:
    """Return seconds for ``value``: a number, or a string such as ``90s``, ``10m``, ``1h30m``.

    >>> parse_duration("10m")
    600.0
    """
    if isinstance(value, bool):
        raise ValueError(_BAD_DURATION)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            parsed = parse_timespan(text)
            if parsed is None:
                raise ValueError(_BAD_DURATION) from None
            seconds = float(parsed)
    else:
        raise ValueError(_BAD_DURATION)
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds, 0 allowed (for example ``ttl: 0`` means never)."""

PositiveDuration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]
"""Seconds, greater than 0 (timeouts)."""

Size = ByteSize
"""Bytes; ``512MiB`` is binary, ``1GB`` decimal, as pydantic's ``ByteSize`` reads them."""
