from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from corral.config.units import Duration, Size, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("10m", 600), ("1h", 3600), ("1h30m", 5400), ("0", 0), ("2.5s", 2.5),
     (45, 45), (1.5, 1.5), ("300", 300)],
)
def test_durations(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "", "10 parsecs", True, None, [1]])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10**6))
def test_minutes_round_trip(minutes: int) -> None:
    assert parse_duration(f"{minutes}m") == minutes * 60


@pytest.mark.parametrize(
    ("text", "size"),
    [("512MiB", 512 * 2**20), ("24GiB", 24 * 2**30), ("1GB", 10**9), (4096, 4096)],
)
def test_sizes(text: str | int, size: int) -> None:
    assert TypeAdapter(Size).validate_python(text) == size


def test_bad_size_and_duration_types() -> None:
    with pytest.raises(ValidationError):
        TypeAdapter(Size).validate_python("lots")
    with pytest.raises(ValidationError):
        TypeAdapter(Duration).validate_python("whenever")
