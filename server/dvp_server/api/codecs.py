"""Body codecs: JSON (the default) and msgpack, chosen per request.

Requests: a body sent with ``Content-Type: application/msgpack`` (or
``application/x-msgpack``, ``application/vnd.msgpack``) is decoded by
:class:`MsgpackBodyMiddleware` before routing and handed on as JSON, so every
route validates the same pydantic models and answers the same error envelopes
whatever the body's encoding. A body that is not msgpack, or holds what JSON
cannot (binary strings, extension types, non-string map keys), gets a 422
``invalid_request_error`` naming the problem, like malformed JSON does.

Responses: a request whose ``Accept`` lists a msgpack type (with q > 0) gets
its response as msgpack (:func:`model_response`). Error bodies stay JSON.

Floats in msgpack: the per-token arrays of rollouts and scores (the values
under :data:`FLOAT32_KEYS`) are float32 numbers on the server (both engines
compute them in float32; the JSON path prints the float64 widening of each),
so they are packed as msgpack float32 (5 bytes instead of 9): lossless, a
client decoding them gets the very float64 values the JSON response holds.
Everything else (the echoed temperature and rule) is packed as float64.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping
from typing import Any

import msgpack
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ServiceError
from .bodies import DECODED_BODY, INLINE_BYTES, body_value_cap, unpack_msgpack
from .errors import error_response

__all__ = [
    "FLOAT32_KEYS",
    "MSGPACK_MEDIA_TYPE",
    "MsgpackBodyMiddleware",
    "model_response",
    "pack",
    "wants_msgpack",
]

MSGPACK_MEDIA_TYPE = "application/msgpack"
MSGPACK_TYPES = frozenset({MSGPACK_MEDIA_TYPE, "application/x-msgpack", "application/vnd.msgpack"})
#: Top-level keys whose values hold only float32-valued floats (packed as float32).
FLOAT32_KEYS = frozenset({"rollouts", "results"})

_PACK64 = msgpack.Packer(use_single_float=False)
_PACK32 = msgpack.Packer(use_single_float=True)


def _media_types(header: str) -> list[tuple[str, float]]:
    """``(type, q)`` of every media range of an Accept / Content-Type header."""
    out: list[tuple[str, float]] = []
    for part in header.split(","):
        fields = [f.strip() for f in part.split(";")]
        q = 1.0
        for f in fields[1:]:
            name, _, value = f.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if fields[0]:
            out.append((fields[0].lower(), q))
    return out


def is_msgpack(content_type: str) -> bool:
    """Whether a Content-Type header names msgpack."""
    return any(t in MSGPACK_TYPES for t, _ in _media_types(content_type))


def wants_msgpack(request: Request) -> bool:
    """Whether the client's Accept header asks for msgpack (a msgpack type with q > 0)."""
    return any(
        t in MSGPACK_TYPES and q > 0 for t, q in _media_types(request.headers.get("accept", ""))
    )


def pack(data: Mapping[str, Any], float32_keys: Iterable[str] = FLOAT32_KEYS) -> bytes:
    """msgpack bytes of a dict, the values of ``float32_keys`` with float32 floats.

    A msgpack map is its header and then each key and value packed on its own,
    so the values can use different packers and the result is one ordinary map.
    """
    f32 = frozenset(float32_keys)
    parts = [_PACK64.pack_map_header(len(data))]
    for key, value in data.items():
        parts.append(_PACK64.pack(key))
        parts.append((_PACK32 if key in f32 else _PACK64).pack(value))
    return b"".join(parts)


def model_response(request: Request, model: BaseModel, status_code: int = 200) -> Response:
    """``model`` as msgpack when the request's Accept asks for it, else as JSON."""
    if wants_msgpack(request):
        return Response(pack(model.model_dump()), status_code, media_type=MSGPACK_MEDIA_TYPE)
    return Response(model.model_dump_json(), status_code, media_type="application/json")


def msgpack_to_json(body: bytes) -> bytes:
    """A msgpack request body re-encoded as JSON bytes (NaN kept, as the JSON path reads it).

    Raises:
        ServiceError: 422 when the body is not one msgpack value, or holds a type
            JSON cannot carry.
    """
    try:
        value = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise _bad_body(f"malformed msgpack body ({detail})") from exc
    try:
        return json.dumps(value, allow_nan=True).encode()
    except RecursionError as exc:
        raise _bad_body("malformed msgpack body (nested too deeply)") from exc
    except (TypeError, ValueError) as exc:  # bytes, ExtType, ...
        raise _bad_body(f"msgpack body holds a value JSON cannot carry: {exc}") from exc


def _unpack_large(body: bytes, cap: int) -> Any:
    """A large msgpack body's value (:func:`bodies.unpack_msgpack`), JSON types only.

    Raises:
        ServiceError: 422 as :func:`msgpack_to_json`; 413 over ``cap`` values.
    """
    try:
        return unpack_msgpack(body, cap)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:  # bin/ext: max len 0
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise _bad_body(f"malformed msgpack body, or a value JSON cannot carry ({detail})") from exc


def _bad_body(message: str) -> ServiceError:
    return ServiceError(422, "invalid_request_error", message, None)


class MsgpackBodyMiddleware:
    """Decode msgpack request bodies into JSON before routing (see the module docstring).

    The whole body is read (the body-size limit sits outside this middleware),
    re-encoded, and handed on with ``Content-Type: application/json``; later
    ``receive`` calls go to the server (so a disconnect is still seen).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        content_type = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
        if not is_msgpack(content_type.decode("latin-1")):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # gone before the body arrived
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        try:
            if len(raw) <= INLINE_BYTES:
                body = msgpack_to_json(raw)
            else:  # decoded off the loop in steps; the route validates it (bodies.py)
                value = await asyncio.to_thread(_unpack_large, raw, body_value_cap(scope["app"]))
                scope = {**scope, DECODED_BODY: value}
                body = b"{}"
        except ServiceError as exc:
            await error_response(exc)(scope, receive, send)
            return
        headers = [
            (k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")
        ]
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app({**scope, "headers": headers}, replay, send)
