"""One service error, one exception -> status map, one error body.

Every failure reaches the client as :class:`dvp_schemas.ErrorResponse`
(``{"error": {"type", "message", "param", "code"}}``):

===============================  ======  ==========================  ==============
exception                        status  type                        param
===============================  ======  ==========================  ==============
ServiceError                     its     its                         its
RequestValidationError           422     invalid_request_error       dotted field
                                                                     (``sampling.
                                                                     temperature``,
                                                                     ``prompts.0``)
HTTPException (404, 405, ...)    its     not_found_error, ...        None
EngineError                      503     engine_error (retryable)    None
anything else                    500     internal_error (logged,     None
                                         generic message)
===============================  ======  ==========================  ==============

The server never dies from a request: the catch-all middleware turns an
unexpected exception into a 500 and logs it with its traceback.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from dvp_schemas import ErrorInfo, ErrorResponse
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .engines.base import EngineError

__all__ = [
    "CatchAllMiddleware",
    "ServiceError",
    "error_response",
    "install_error_handlers",
    "validation_error",
]

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
RETRY_AFTER_S = 1  # Retry-After on a 503: the engine failed a rollout, not the request
_MAX_REPORTED = 5  # validation errors listed in one message
_HTTP_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "method_not_allowed_error",
    413: "request_too_large_error",
    415: "unsupported_media_type_error",
}


class ServiceError(Exception):
    """A request the service refuses (or cannot serve), with its HTTP status.

    Args:
        status: HTTP status code (4xx for the request's fault, 5xx for ours).
        type: machine-readable kind, e.g. ``"invalid_request_error"``.
        message: what went wrong, naming the field.
        param: dotted path of the offending field (``"prompts.0.3"``), if any.
    """

    def __init__(self, status: int, type: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.param = param


def validation_error(param: str, message: str) -> ServiceError:
    """A 422 ``invalid_request_error`` naming ``param`` (the message is prefixed with it)."""
    return ServiceError(422, INVALID_REQUEST, f"{param}: {message}", param)


def _envelope(
    status: int,
    type: str,
    message: str,
    param: str | None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    message, param = _printable(message), None if param is None else _printable(param)
    body = ErrorResponse(error=ErrorInfo(type=type, message=message, param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _printable(text: str) -> str:
    """``text`` with lone surrogates (echoed from a request) written as ``\\udXXX``, so
    the error body can always be encoded as UTF-8."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(exc: BaseException) -> JSONResponse:
    """The exception -> status map (see the module table); the single place bodies are made."""
    if isinstance(exc, ServiceError):
        return _envelope(exc.status, exc.type, exc.message, exc.param)
    if isinstance(exc, RequestValidationError):
        param, message = describe_validation_errors(exc.errors())
        return _envelope(422, INVALID_REQUEST, message, param)
    if isinstance(exc, StarletteHTTPException):
        kind = _HTTP_TYPES.get(exc.status_code, "http_error")
        return _envelope(exc.status_code, kind, str(exc.detail), None, exc.headers)
    if isinstance(exc, EngineError):
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        return _envelope(503, "engine_error", f"engine error (retryable): {exc}", None, headers)
    logger.error("unexpected error while serving a request", exc_info=exc)
    return _envelope(500, "internal_error", "internal server error (logged on the server)", None)


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception kind of the module table through :func:`error_response`."""
    for kind in (ServiceError, RequestValidationError, StarletteHTTPException, EngineError):
        app.add_exception_handler(kind, _handle)
    app.add_middleware(CatchAllMiddleware)


class CatchAllMiddleware:
    """Turn an exception escaping the routes into a logged 500 error body.

    (Starlette's own fallback re-raises into the server after answering; this
    answers and stops there, so one bad request is one log entry.)
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:
            response = error_response(exc)
            if started:  # too late for a body: the connection is closed on the client
                return
            await response(scope, receive, send)


# --- validation errors -> (param, message) -------------------------------------------

_FIELD = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict", "bytes"})
_INDEXED = re.compile(r"\b([a-z_][a-z0-9_]*)\[(\d+)\]")
_MESSAGES = {
    "extra_forbidden": "unknown field",
    "json_invalid": "malformed JSON",
    "missing": "field required",
}


def _is_union_tag(part: Any) -> bool:
    """pydantic puts the union member's name (``'list[int]'``) into ``loc``; fields are
    snake_case, so anything else that is a string is such a tag."""
    return isinstance(part, str) and (not _FIELD.fullmatch(part) or part in _TYPE_TAGS)


def _path(loc: Sequence[Any]) -> tuple[str, list[int]]:
    """Dotted path without the ``body`` prefix or union tags, and the tag positions."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    keep = [str(p) for p in parts if not _is_union_tag(p)]
    tags = [i for i, p in enumerate(parts) if _is_union_tag(p)]
    return ".".join(keep), tags


def _pick_union_branch(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Of errors from several union members, keep the member that got deepest.

    A prompt ``[1, "x"]`` fails as text (at the prompt), as token ids (at item 1)
    and as chat messages (at items 0 and 1); the token-id member went deepest with
    the fewest errors, so its error is the one that explains the mistake.
    """
    branches: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for err in errors:
        loc = list(err["loc"])
        tag_at = next((i for i, p in enumerate(loc) if _is_union_tag(p)), None)
        key = tuple(loc[: tag_at + 1]) if tag_at is not None else tuple(loc)
        branches.setdefault(key, []).append(err)
    if len(branches) < 2:
        return errors

    def rank(errs: list[dict[str, Any]]) -> tuple[int, int]:
        return (max(len(e["loc"]) for e in errs), -len(errs))

    best = max(branches.values(), key=rank)
    if all(rank(b) == rank(best) for b in branches.values()):
        return errors  # no member fits better than another: report them together
    return best


def describe_validation_errors(errors: Sequence[Any]) -> tuple[str | None, str]:
    """``(param, message)`` for pydantic/FastAPI validation errors.

    ``param`` is the dotted path of the first error without the ``body.`` prefix
    (``"sampling.temperature"``, ``"prompts.0"``); the message lists up to five
    errors as ``"<path>: <what>"``. A malformed JSON body has no param.
    """
    errs = [dict(e) for e in errors]
    if not errs:
        return None, "invalid request"
    if errs[0].get("type") == "json_invalid":
        detail = (errs[0].get("ctx") or {}).get("error", "")
        return None, f"malformed JSON body: {detail}".rstrip(": ")
    errs = _pick_union_branch(errs)
    lines: list[str] = []
    params: list[str] = []
    for err in errs:
        path, tags = _path(err["loc"])
        what = str(_MESSAGES.get(err.get("type", "")) or err.get("msg") or "invalid value")
        what = what.removeprefix("Value error, ")
        indexed = _INDEXED.search(what)  # "prompts[0] is ..." names the item
        if indexed and indexed.group(1) == path:
            path = f"{path}.{indexed.group(2)}"
        if tags and len(errs) > 1 and err.get("type", "").endswith("_type"):
            what = f"{what} (as {err['loc'][-1]})" if _is_union_tag(err["loc"][-1]) else what
        line = f"{path or 'body'}: {what}"
        if line not in lines:
            lines.append(line)
            params.append(path)
    message = "; ".join(lines[:_MAX_REPORTED])
    if len(lines) > _MAX_REPORTED:
        message += f"; and {len(lines) - _MAX_REPORTED} more"
    return (params[0] or None), message
