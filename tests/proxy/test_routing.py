from __future__ import annotations

import pytest

from corral.proxy.errors import BadRequestError
from corral.proxy.routing import model_name, parse_body


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "the request body is empty"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, got an array"),
        (b'"text"', "must be a JSON object, got a string"),
        (b"null", "must be a JSON object, got null"),
    ],
)
def test_bodies_that_are_not_objects(body: bytes, message: str) -> None:
    with pytest.raises(BadRequestError, match=message) as info:
        parse_body(body)
    assert info.value.status == 400


def test_model_name() -> None:
    assert model_name({"model": "smol"}, None) == "smol"
    assert model_name({"model": "smol"}, "other") == "smol"
    assert model_name({}, "dflt") == "dflt"
    with pytest.raises(BadRequestError, match="no default_model"):
        model_name({}, None)
    with pytest.raises(BadRequestError, match="must be a string, got a number"):
        model_name({"model": 3}, "dflt")
    with pytest.raises(BadRequestError, match="must not be empty"):
        model_name({"model": ""}, "dflt")
