"""The HTTP half of error handling: one exception -> status map, one error body.

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

A :class:`~dvp_server.errors.ServiceError`'s headers go with it (a 429's
``Retry-After``). The server never dies from a request: the catch-all middleware
(``middleware.py``) turns an unexpected exception into a logged 500. A failure
inside a stream that has started is the same body as a stream event
(:func:`error_info`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from dvp_schemas import ErrorInfo, ErrorResponse
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engines.base import EngineError
from ..errors import INVALID_REQUEST, ServiceError, describe_validation_errors

__all__ = ["error_info", "error_response", "install_error_handlers", "responses"]

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # Retry-After on a 503: the engine failed a rollout, not the request
_HTTP_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "method_not_allowed_error",
    408: "request_timeout_error",
    413: "request_too_large_error",
    415: "unsupported_media_type_error",
}

#: What each error status means, for every route's OpenAPI ``responses``.
DESCRIBED: dict[int, str] = {
    401: "Missing or wrong API key.",
    404: "Model not served / no such route.",
    408: "The request body stalled (see --read-timeout); the connection is closed.",
    413: "Request body over the limit.",
    422: "Invalid request; `param` names the field.",
    429: "The rollout queue is full; retry after Retry-After.",
    499: "Client closed the connection.",
    500: "Unexpected server error (logged).",
    501: "The served engine cannot do this (see /v1/models capabilities).",
    503: "Engine unavailable or failed; retryable.",
}


def responses(
    codes: Iterable[int] | Mapping[int, str],
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries: each code answers with the error envelope.

    Args:
        codes: status codes (described by :data:`DESCRIBED`), or a mapping of code to
            a description of what it means on this route.
    """
    described = dict(codes) if isinstance(codes, Mapping) else {c: DESCRIBED[c] for c in codes}
    return {c: {"model": ErrorResponse, "description": d} for c, d in described.items()}


def _printable(text: str) -> str:
    """``text`` with lone surrogates (echoed from a request) written as ``\\udXXX``, so
    the error body can always be encoded as UTF-8."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _classify(exc: BaseException) -> tuple[ErrorInfo, dict[str, str]]:
    """The module table: the error body's fields and the headers of ``exc``."""
    headers: dict[str, str] = {}
    if isinstance(exc, ServiceError):
        status, kind, message, param = exc.status, exc.type, exc.message, exc.param
        headers = dict(exc.headers)
        retry = getattr(exc, "retry_after_s", None)  # the admission's 429
        if retry is not None:
            headers.setdefault("Retry-After", str(retry))
    elif isinstance(exc, RequestValidationError):
        param, message = describe_validation_errors(exc.errors())
        status, kind = 422, INVALID_REQUEST
    elif isinstance(exc, StarletteHTTPException):
        status, kind = exc.status_code, _HTTP_TYPES.get(exc.status_code, "http_error")
        message, param = str(exc.detail), None
        headers = dict(exc.headers or {})
    elif isinstance(exc, EngineError):
        status, kind, message, param = 503, "engine_error", f"engine error (retryable): {exc}", None
        headers = {"Retry-After": str(RETRY_AFTER_S)}
    else:
        logger.error("unexpected error while serving a request", exc_info=exc)
        status, kind = 500, "internal_error"
        message, param = "internal server error (logged on the server)", None
    message, param = _printable(message), None if param is None else _printable(param)
    return ErrorInfo(type=kind, message=message, param=param, code=status), headers


def error_info(exc: BaseException) -> ErrorInfo:
    """The error body's fields for ``exc`` (a stream's ``error`` event)."""
    return _classify(exc)[0]


def error_response(exc: BaseException) -> JSONResponse:
    """The exception -> status map (see the module table); the single place bodies are made."""
    info, headers = _classify(exc)
    body = ErrorResponse(error=info)
    return JSONResponse(body.model_dump(), status_code=info.code, headers=headers or None)


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception kind of the module table through :func:`error_response`."""
    for kind in (ServiceError, RequestValidationError, StarletteHTTPException, EngineError):
        app.add_exception_handler(kind, _handle)
