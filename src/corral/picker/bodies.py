"""Find the request's model in a JSON body while Envoy streams it, chunk by chunk.

OpenAI (``/v1/chat/completions``), Anthropic (``/v1/messages``), llama.cpp-native
(``/completion``) and Ollama (``/api/chat``, ``/api/generate``) bodies all name the model in a
top-level ``"model"`` key (llama.cpp-native may leave it out). ``ModelSniffer`` scans only the
top level of the object: it skips nested values without keeping them, holds at most one short key
and the model's value, and answers as soon as the ``"model"`` value is complete, so a prompt of
megabytes that follows the model is never buffered, and one that precedes it is only skipped.

Usage::

    sniffer = ModelSniffer()
    for chunk, last in chunks:
        found = sniffer.feed(chunk, last)
        if found is not MORE:
            break          # found: the model's name, or None (the body names no model)
"""

from __future__ import annotations

import json
import re
from types import EllipsisType
from typing import Final

from corral.errors import BadRequestError

MORE: Final = ...
"""``feed`` answers this while the body so far does not yet say which model it names."""

MAX_MODEL_BYTES = 512   # a model name (with escapes) longer than this is refused
_MAX_KEY_BYTES = 32     # longer keys are skipped without being kept: they are not "model"
_WS = b" \t\r\n"
# Inside a skipped nested value only quotes, backslashes and brackets matter.
_NESTED = re.compile(rb'["{}\[\]\\]')
_STRING = re.compile(rb'["\\]')
_SCALAR_END = re.compile(rb"[,}\] \t\r\n]")

# States of the top-level scan.
_START, _KEY_OR_END, _KEY, _IN_KEY, _COLON, _VALUE, _IN_MODEL, _SKIP_STRING, _SKIP_NESTED, \
    _SKIP_SCALAR, _NULL, _COMMA_OR_END = range(12)


class BodyError(BadRequestError):
    """The body is not a JSON object, or its ``model`` is not a string."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_body", status=400)


class ModelSniffer:
    """An incremental scan for the top-level ``"model"`` of one request body.

    ``feed(chunk, end_of_stream)`` returns the model's name once its value is complete, None
    when the body ends (or its object closes) without one or says ``"model": null``, or
    ``MORE`` while it cannot tell yet. After an answer, further calls repeat it. A body that
    is not a JSON object, or a ``model`` that is not a string, raises ``BodyError``; a body
    that ends mid-object without a model raises it too.
    """

    def __init__(self) -> None:
        self._state = _START
        self._escape = False       # the previous byte of a string was an unescaped backslash
        self._depth = 0            # nesting depth inside a skipped value
        self._in_string = False    # inside a string inside a skipped nested value
        self._buf = bytearray()    # the current key, or the model's value, raw
        self._long_key = False
        self._is_model = False
        self._null = 0             # bytes of "null" seen so far
        self._answer: str | None | EllipsisType = MORE
        self.bytes_seen = 0

    def feed(self, chunk: bytes, end_of_stream: bool = False) -> str | None | EllipsisType:
        """Scan ``chunk``; see the class docstring for the answers."""
        if self._answer is not MORE:
            return self._answer
        self.bytes_seen += len(chunk)
        self._answer = self._scan(chunk)
        if self._answer is MORE and end_of_stream:
            if self._state == _START:       # an empty body (or only whitespace): no model
                self._answer = None
            else:
                raise BodyError("the request body ends before its JSON object does")
        return self._answer

    def _scan(self, data: bytes) -> str | None | EllipsisType:  # noqa: C901 - one state machine
        i, n = 0, len(data)
        while i < n:
            state = self._state
            if state in (_SKIP_STRING, _IN_KEY, _IN_MODEL) or (
                    state == _SKIP_NESTED and self._in_string):
                i = self._string(data, i)
                if self._answer is not MORE:
                    return self._answer
                continue
            if state == _SKIP_NESTED:
                match = _NESTED.search(data, i)
                if match is None:
                    return MORE
                c = data[match.start()]
                i = match.end()
                if c == 0x22:       # "
                    self._in_string = True
                elif c in b"{[":
                    self._depth += 1
                elif c in b"}]":
                    self._depth -= 1
                    if self._depth == 0:
                        self._state = _COMMA_OR_END
                continue
            if state == _SKIP_SCALAR:
                match = _SCALAR_END.search(data, i)
                if match is None:
                    return MORE
                i = match.start()
                self._state = _COMMA_OR_END
                continue
            c = data[i]
            if c in _WS and state != _NULL:
                i += 1
                continue
            i += 1
            if state == _START:
                if c != 0x7B:   # {
                    raise BodyError("the request body is not a JSON object")
                self._state = _KEY_OR_END
            elif state in (_KEY_OR_END, _KEY):
                if c == 0x22:
                    self._state, self._buf, self._long_key = _IN_KEY, bytearray(), False
                elif c == 0x7D and state == _KEY_OR_END:   # {} : no model
                    return None
                else:
                    raise BodyError("the request body is not valid JSON (a key was expected)")
            elif state == _COLON:
                if c != 0x3A:
                    raise BodyError("the request body is not valid JSON (':' was expected)")
                self._state = _VALUE
            elif state == _VALUE:
                self._value_starts(c)
            elif state == _NULL:
                self._null += 1
                if c != b"null"[self._null - 1]:
                    raise BodyError('"model" must be a string naming a model')
                if self._null == 4:
                    return None
            elif state == _COMMA_OR_END:
                if c == 0x2C:
                    self._state = _KEY
                elif c == 0x7D:
                    return None     # the object closed without a model
                else:
                    raise BodyError("the request body is not valid JSON (',' or '}' expected)")
            if self._answer is not MORE:
                return self._answer
        return MORE

    def _value_starts(self, c: int) -> None:
        if self._is_model:
            if c == 0x22:
                self._state, self._buf = _IN_MODEL, bytearray()
            elif c == 0x6E:     # n(ull)
                self._state, self._null = _NULL, 1
            else:
                raise BodyError('"model" must be a string naming a model')
        elif c == 0x22:
            self._state = _SKIP_STRING
        elif c in b"{[":
            self._state, self._depth, self._in_string = _SKIP_NESTED, 1, False
        elif c in b"-0123456789tfnIN":     # Infinity and NaN: Python's json (corral's) takes them
            self._state = _SKIP_SCALAR
        else:
            raise BodyError("the request body is not valid JSON (a value was expected)")

    def _string(self, data: bytes, i: int) -> int:
        """Advance through a string from ``i``; on its closing quote, act on it."""
        if self._escape:            # the byte after a backslash, whatever it is
            self._escape = False
            self._keep(data[i:i + 1])
            return i + 1
        match = _STRING.search(data, i)
        end = match.start() if match else len(data)
        self._keep(data[i:end])
        if match is None:
            return end
        if data[end] == 0x5C:       # backslash
            self._keep(b"\\")
            self._escape = True
            return end + 1
        self._closed()
        return end + 1

    def _keep(self, part: bytes) -> None:
        state = self._state
        if state == _IN_KEY and not self._long_key:
            self._buf += part
            if len(self._buf) > _MAX_KEY_BYTES:
                self._long_key, self._buf = True, bytearray()
        elif state == _IN_MODEL:
            self._buf += part
            if len(self._buf) > MAX_MODEL_BYTES:
                raise BodyError(f'"model" is longer than {MAX_MODEL_BYTES} bytes')

    def _closed(self) -> None:
        state = self._state
        if state == _IN_KEY:
            self._is_model = not self._long_key and _decode(self._buf) == "model"
            self._state = _COLON
        elif state == _IN_MODEL:
            self._answer = _decode(self._buf)
        elif state == _SKIP_STRING:
            self._state = _COMMA_OR_END
        else:                       # a string inside a skipped nested value
            self._in_string = False


def _decode(raw: bytes | bytearray) -> str:
    try:
        value = json.loads(b'"' + bytes(raw) + b'"')
    except ValueError:
        raise BodyError("the request body has a malformed JSON string") from None
    assert isinstance(value, str)
    return value


def sniff_model(body: bytes) -> str | None:
    """The model a whole body names (None when it names none); ``BodyError`` if malformed."""
    found = ModelSniffer().feed(body, end_of_stream=True)
    assert found is not MORE
    return found
