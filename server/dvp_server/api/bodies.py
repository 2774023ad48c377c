"""Request bodies decoded and validated without stalling the event loop.

FastAPI decodes a JSON body (``json.loads``) and validates it (pydantic) on the
event loop. Both are single C calls that hold the GIL: a 64 MiB body of token
ids took 3.7 s to decode and 4.0 s to validate, during which no other request
(``/health`` included) was answered, and a thread alone would not help (the
GIL stays held). So, for every route that takes a JSON body
(:func:`install_body_decoding`):

- a body up to :data:`INLINE_BYTES` is decoded and validated inline (a few ms);
- a larger one is decoded in a worker thread by :func:`decode_json`, which
  parses containers itself and hands ``json`` at most :data:`CHUNK_CHARS`
  characters per call (runs of plain scalars in one call), so the GIL is
  released between calls; it counts the values it makes and stops at the
  request's value cap (413, :func:`value_cap`) before anything is built that
  validation would take long over; then it is validated in the thread too;
- a msgpack body arrives already decoded (``codecs.MsgpackBodyMiddleware`` puts
  it under :data:`DECODED_BODY` in the scope; :func:`unpack_msgpack` feeds the
  unpacker in chunks for the same reason) and is counted, then validated.

The validated model is handed to FastAPI, which accepts an instance of its
body model as it is. Decoding failures of any kind or depth are 4xx in the
error envelope: malformed JSON, nesting deeper than :data:`MAX_DEPTH`, a body
that is not UTF-8 (422, no param), too many values (413).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute, request_response

from ..errors import ServiceError

__all__ = [
    "CHUNK_CHARS",
    "DECODED_BODY",
    "INLINE_BYTES",
    "MAX_DEPTH",
    "body_value_cap",
    "count_values",
    "decode_json",
    "install_body_decoding",
    "unpack_msgpack",
    "value_cap",
]

INLINE_BYTES = 256 << 10  # decoded + validated on the loop: ~30 ms at worst
CHUNK_CHARS = 64 << 10  # most text one regex + json call parses (~5 ms of the GIL)
MAX_DEPTH = 64  # request bodies nest 5 deep; deeper is malformed (json.loads dies at ~1000)
DECODED_BODY = "dvp.decoded_body"  # scope key of a body decoded before routing (msgpack)
_VALUE_SLACK = 1 << 16  # values a request holds beside its token ids (fields, stop, ...)

_WS = re.compile(r"[ \t\n\r]*")
_NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?"
_SCALAR = rf'(?:{_NUMBER}|"[^"\\\x00-\x1f]*"|true|false|null)'  # no escapes in strings
# plain scalars, each with its comma; possessive (++): linear, no backtracking
_RUN = re.compile(rf"(?:[ \t\n\r]*{_SCALAR}[ \t\n\r]*,)++")
_PLAIN = re.compile(r'[^"\\\x00-\x1f]*+')  # string characters that need no decoding
_ESCAPES = re.compile(r'(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))++')
_HIGH_SURROGATE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}$")
_DECODER = json.JSONDecoder()


def value_cap(max_rollouts: int, max_model_len: int) -> int:
    """Most values (numbers, strings, ... of any depth) a body may hold.

    Every id list of a request within the limits (prompts, score sequences) is at
    most one context long and there are at most ``max_rollouts`` of them, so
    ``max_rollouts * max_model_len`` plus a slack for the other fields never
    refuses a request that the limits accept.
    """
    return max_rollouts * max_model_len + _VALUE_SLACK


def _too_many(cap: int) -> ServiceError:
    return ServiceError(
        413,
        "request_too_large_error",
        f"request body holds more than {cap} values (numbers, strings, ...); a request "
        "within the server limits holds fewer",
    )


class _Parser:
    """Recursive descent over containers; scalars and runs of scalars go to ``json``."""

    def __init__(self, text: str, cap: int) -> None:
        self.text = text
        self.cap = cap
        self.count = 0

    def _add(self, n: int) -> None:
        self.count += n
        if self.count > self.cap:
            raise _too_many(self.cap)

    def _expect(self, what: str, pos: int) -> json.JSONDecodeError:
        return json.JSONDecodeError(f"Expecting {what}", self.text, pos)

    def value(self, pos: int, depth: int) -> tuple[Any, int]:
        pos = _WS.match(self.text, pos).end()  # type: ignore[union-attr]
        c = self.text[pos : pos + 1]
        if c in ("[", "{"):
            if depth >= MAX_DEPTH:
                raise json.JSONDecodeError(f"nested deeper than {MAX_DEPTH} levels", self.text, pos)
            return (self.array if c == "[" else self.object)(pos + 1, depth + 1)
        self._add(1)
        if c == '"':
            return self.string(pos + 1)
        return _DECODER.raw_decode(self.text, pos)  # a number, true, false, null

    def _after_item(self, pos: int, close: str) -> tuple[bool, int]:
        """Past the separator after an item: (container closed?, position)."""
        pos = _WS.match(self.text, pos).end()  # type: ignore[union-attr]
        c = self.text[pos : pos + 1]
        if c == ",":
            return False, pos + 1
        if c == close:
            return True, pos + 1
        raise self._expect(f"',' delimiter or '{close}'", pos)

    def string(self, pos: int) -> tuple[str, int]:
        """The string whose opening quote is at ``pos - 1``, in chunks: plain runs are
        sliced, escape runs decoded by ``json`` (a surrogate pair is never split)."""
        text, parts, start = self.text, [], pos
        while True:
            bound = min(len(text), pos + CHUNK_CHARS)
            pos = _PLAIN.match(text, pos, bound).end()  # type: ignore[union-attr]
            parts.append(text[start:pos])
            if pos == bound and bound < len(text):
                start = pos
                continue
            c = text[pos : pos + 1]
            if c == '"':
                return "".join(parts), pos + 1
            if c != "\\":
                what = "Unterminated string" if not c else "Invalid control character"
                raise json.JSONDecodeError(what, text, pos)
            bound = min(len(text), pos + CHUNK_CHARS)
            run = _ESCAPES.match(text, pos, bound)
            if run is None:
                raise json.JSONDecodeError("Invalid \\escape", text, pos)
            end = run.end()
            while _HIGH_SURROGATE.search(text, end - 6, end) and (
                nxt := _ESCAPES.match(text, end, end + 6)  # a pair's halves stay together
            ):
                end = nxt.end()
            parts.append(json.loads('"' + text[pos:end] + '"'))
            start = pos = end

    def array(self, pos: int, depth: int) -> tuple[list[Any], int]:
        out: list[Any] = []
        pos = _WS.match(self.text, pos).end()  # type: ignore[union-attr]
        if self.text[pos : pos + 1] == "]":
            return out, pos + 1
        while True:
            end = min(len(self.text), pos + CHUNK_CHARS)
            run = _RUN.match(self.text, pos, end)
            if run is not None:  # bounded: the match cannot pass `end`
                items = json.loads("[" + self.text[pos : run.end() - 1] + "]")
                self._add(len(items))
                out.extend(items)
                pos = run.end()
            item, pos = self.value(pos, depth)
            out.append(item)
            closed, pos = self._after_item(pos, "]")
            if closed:
                return out, pos

    def object(self, pos: int, depth: int) -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {}
        pos = _WS.match(self.text, pos).end()  # type: ignore[union-attr]
        if self.text[pos : pos + 1] == "}":
            return out, pos + 1
        while True:
            pos = _WS.match(self.text, pos).end()  # type: ignore[union-attr]
            if self.text[pos : pos + 1] != '"':
                raise self._expect("property name enclosed in double quotes", pos)
            key, pos = self.string(pos + 1)
            pos = _WS.match(self.text, pos).end()  # type: ignore[union-attr]
            if self.text[pos : pos + 1] != ":":
                raise self._expect("':' delimiter", pos)
            out[key], pos = self.value(pos + 1, depth)
            closed, pos = self._after_item(pos, "}")
            if closed:
                return out, pos


def decode_json(body: bytes, cap: int) -> Any:
    """The JSON value of ``body``, as ``json.loads`` gives it, in GIL-releasing steps.

    Raises:
        json.JSONDecodeError: malformed JSON, not UTF-8, or nested deeper than
            :data:`MAX_DEPTH`.
        ServiceError: 413, more than ``cap`` values.
    """
    text = _utf8(body)
    parser = _Parser(text, cap)
    value, pos = parser.value(0, 0)
    pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
    if pos != len(text):
        raise json.JSONDecodeError("Extra data", text, pos)
    return value


def _utf8(body: bytes) -> str:
    """``body.decode("utf-8")`` in :data:`CHUNK_CHARS` steps (a character split across
    two steps is held back by the incremental decoder)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        parts = [
            decoder.decode(body[i : i + CHUNK_CHARS]) for i in range(0, len(body), CHUNK_CHARS)
        ]
        parts.append(decoder.decode(b"", final=True))
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError(f"body is not UTF-8 ({exc.reason})", "", 0) from exc
    return "".join(parts)


def unpack_msgpack(body: bytes, cap: int, chunk: int = CHUNK_CHARS) -> Any:
    """The one msgpack value of ``body``, fed to a streaming unpacker ``chunk`` bytes at
    a time (the unpacker resumes where it stopped, so each call holds the GIL briefly).

    Raises:
        ServiceError: 413, more than ``cap`` values (an array or map announced longer
            is refused at its header, before its items are built).
        ValueError, msgpack.UnpackException: malformed, truncated or trailing data;
            nesting deeper than msgpack's stack (``StackError``).
    """
    unpacker = msgpack.Unpacker(  # bin and ext are refused (JSON cannot carry them)
        raw=False,
        strict_map_key=True,
        max_buffer_size=len(body) + 1,
        max_bin_len=0,
        max_ext_len=0,
        max_array_len=cap,
        max_map_len=cap,
    )
    value: Any = None
    done = False
    for start in range(0, len(body), chunk):
        if done:
            raise ValueError("extra data after the msgpack value")
        unpacker.feed(body[start : start + chunk])
        try:
            value, done = unpacker.unpack(), True
        except msgpack.OutOfData:
            continue
        except ValueError as exc:
            if "exceeds max_array_len" in str(exc) or "exceeds max_map_len" in str(exc):
                raise _too_many(cap) from exc
            raise
    if not done:
        raise ValueError("truncated msgpack body" if body else "empty msgpack body")
    if unpacker.tell() != len(body):
        raise ValueError("extra data after the msgpack value")
    if count_values(value, cap) > cap:
        raise _too_many(cap)  # freed here, in the worker thread, not on the loop
    return value


def count_values(value: Any, cap: int) -> int:
    """Values in a decoded body (container items, any depth), stopping once over ``cap``."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict | list):
            items = item.values() if isinstance(item, dict) else item
            total += len(items)
            if total > cap:
                return total
            stack.extend(x for x in items if isinstance(x, dict | list))
    return total


def _json_error(exc: json.JSONDecodeError) -> RequestValidationError:
    """FastAPI's own form of a malformed JSON body (``errors.py`` words it)."""
    error = {"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error"}
    return RequestValidationError([{**error, "input": {}, "ctx": {"error": exc.msg}}])


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "application/json").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and "+json" in media)


def _decoder(route: APIRoute, handler: Callable[[Request], Awaitable[Response]]) -> Any:
    """``handler`` behind a step that decodes and validates the body (module docstring)."""
    field = route.body_field
    assert field is not None

    def validate(value: Any) -> Any:
        model, errors = field.validate(value, {}, loc=("body",))
        if errors:
            raise RequestValidationError(errors)
        return model

    def decode_and_validate(body: bytes, cap: int) -> Any:
        return validate(decode_json(body, cap))

    async def decode_first(request: Request) -> Response:
        cap = body_value_cap(request.app)
        decoded = request.scope.pop(DECODED_BODY, _NOTHING)  # the thread frees it
        try:
            if decoded is not _NOTHING:  # msgpack, decoded (and counted) by the middleware
                model = await asyncio.to_thread(validate, decoded)
            else:
                body = await request.body()
                if not body or not _is_json(request.headers.get("content-type")):
                    return await handler(request)  # FastAPI's own answer (missing body, ...)
                if len(body) <= INLINE_BYTES:
                    model = validate(_loads(body))
                else:
                    model = await asyncio.to_thread(decode_and_validate, body, cap)
        except json.JSONDecodeError as exc:
            raise _json_error(exc) from exc
        request._json = model  # FastAPI takes an instance of its body model as it is
        return await handler(request)

    return decode_first


_NOTHING = object()


def _loads(body: bytes) -> Any:
    """``json.loads`` with every failure as a JSONDecodeError (depth: RecursionError)."""
    try:
        return json.loads(body)
    except RecursionError as exc:
        raise json.JSONDecodeError("nested too deeply", "", 0) from exc
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError(f"body is not UTF-8 ({exc.reason})", "", exc.start) from exc


def body_value_cap(app: Any) -> int:
    """:func:`value_cap` of the app's served engine and limits."""
    service = getattr(app.state, "service", None)
    if service is None:  # not started: only the slack
        return _VALUE_SLACK
    info = service.engine.info
    return value_cap(service.config.max_rollouts_per_request, info.max_model_len)


def install_body_decoding(app: FastAPI) -> None:
    """Decode every JSON-body route's body with :func:`decode_json` (call after the routes)."""
    for route in app.router.routes:
        if isinstance(route, APIRoute) and route.body_field is not None:
            route.app = request_response(_decoder(route, route.get_route_handler()))
