"""Exceptions raised by the dvp-serve HTTP client.

The tree::

    DVPError
    └── APIError                        every failure of a call to the service
        ├── APIStatusError              the server answered 4xx / 5xx
        │   ├── BadRequestError             400
        │   ├── AuthenticationError         401
        │   ├── PermissionDeniedError       403
        │   ├── NotFoundError               404
        │   ├── ConflictError               409
        │   ├── PayloadTooLargeError        413
        │   ├── UnprocessableEntityError    422
        │   ├── RateLimitError              429
        │   └── InternalServerError         >= 500
        │       └── ServiceUnavailableError     503
        ├── APIConnectionError          no response: refused, reset, DNS, ...
        │   └── APITimeoutError             the timeout ran out
        ├── APIResponseValidationError  a 2xx whose body does not fit the schema
        └── APIStreamError              a stream failed after it began (its error event)

A status error carries the status, the parsed error body (``type``,
``message``, ``param``; see :class:`dvp_schemas.ErrorInfo`), the raw body, the
response and the request id. Transport failures are raised ``from`` the httpx
exception, so the cause stays in the traceback. Bad arguments never get here:
they fail client side as a ``pydantic.ValidationError`` before any network.
"""

from __future__ import annotations

from typing import Any

import httpx

from ._constants import REQUEST_ID_HEADER

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APIStreamError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "DVPError",
    "InternalServerError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServiceUnavailableError",
    "UnprocessableEntityError",
    "make_status_error",
]


class DVPError(Exception):
    """Root of every exception this package raises on purpose."""


class APIError(DVPError):
    """A call to the service failed.

    Attributes:
        message: Human-readable description.
        request: The httpx request of the last attempt.
        body: The decoded JSON body (or text) of the response, if there was one.
    """

    def __init__(self, message: str, request: httpx.Request, *, body: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request
        self.body = body


class APIStatusError(APIError):
    """The server answered with a 4xx or 5xx status.

    Attributes:
        status_code: The HTTP status.
        response: The httpx response.
        request_id: The ``X-Request-Id`` of the response (or of the request).
        type: The error kind from the body, e.g. ``"invalid_request_error"``.
        param: Dotted path of the offending field, when the server named one.
    """

    def __init__(
        self,
        message: str,
        *,
        response: httpx.Response,
        body: object,
        type: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message, response.request, body=body)
        self.response = response
        self.status_code = response.status_code
        self.request_id = response.headers.get(REQUEST_ID_HEADER) or response.request.headers.get(
            REQUEST_ID_HEADER
        )
        self.type = type
        self.param = param


class BadRequestError(APIStatusError):
    """400: the request is malformed."""


class AuthenticationError(APIStatusError):
    """401: missing or wrong API key (set ``api_key=`` or ``DVP_API_KEY``)."""


class PermissionDeniedError(APIStatusError):
    """403: the key may not do this."""


class NotFoundError(APIStatusError):
    """404: no such route or model."""


class ConflictError(APIStatusError):
    """409: conflicts with the server's state (e.g. a weight update); retried."""


class PayloadTooLargeError(APIStatusError):
    """413: the body is over the server's size limit."""


class UnprocessableEntityError(APIStatusError):
    """422: a field is invalid; ``param`` names it."""


class RateLimitError(APIStatusError):
    """429: the server's queue is full; retried after its Retry-After."""


class InternalServerError(APIStatusError):
    """A status >= 500; retried."""


class ServiceUnavailableError(InternalServerError):
    """503: starting, draining or overloaded; retried."""


class APIConnectionError(APIError):
    """No response came back (connection refused or reset, DNS failure, ...)."""

    def __init__(self, request: httpx.Request, message: str = "Connection error.") -> None:
        super().__init__(message, request)


class APITimeoutError(APIConnectionError):
    """The request timed out (see ``timeout=``)."""

    def __init__(self, request: httpx.Request) -> None:
        super().__init__(request, "Request timed out.")


class APIResponseValidationError(APIError):
    """A successful response whose body does not fit the expected schema."""

    def __init__(self, response: httpx.Response, body: object, message: str) -> None:
        super().__init__(message, response.request, body=body)
        self.response = response
        self.status_code = response.status_code


class APIStreamError(APIError):
    """A streamed response (status 200) that ended with an ``error`` event: the server
    failed after the stream began, and aborted the request's other work.

    Attributes:
        response: The httpx response of the stream.
        code: The status the error would have had (503: engine failure, retryable).
        type: The error kind, e.g. ``"engine_error"``.
        param: Dotted path of the offending field, if any.
    """

    def __init__(self, response: httpx.Response, error: Any) -> None:
        super().__init__(f"Stream error {error.code} - {error.message}", response.request)
        self.response = response
        self.code = int(error.code)
        self.type = error.type
        self.param = error.param


_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def _error_fields(body: object) -> tuple[str | None, str | None, str | None]:
    """(type, message, param) from ``{"error": {...}}`` or FastAPI's ``{"detail": ...}``."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = error.get("message")
            param = error.get("param")
            return (
                str(error["type"]) if error.get("type") is not None else None,
                str(message) if message is not None else None,
                str(param) if param is not None else None,
            )
        if "detail" in body:
            return None, str(body["detail"]), None
    return None, None, None


def make_status_error(response: httpx.Response) -> APIStatusError:
    """The exception for a 4xx/5xx response, its error body parsed.

    Args:
        response: A response whose body has been read.

    Returns:
        An instance of the :class:`APIStatusError` subclass keyed by the status.
    """
    body: Any
    try:
        body = response.json()
    except ValueError:
        body = response.text or None
    type_, message, param = _error_fields(body)
    if message is None:
        message = body if isinstance(body, str) and body else response.reason_phrase
    cls = _STATUS_ERRORS.get(response.status_code)
    if cls is None:
        cls = InternalServerError if response.status_code >= 500 else APIStatusError
    text = f"Error code: {response.status_code} - {message}"
    if param and param not in message:
        text += f" (param: {param})"
    return cls(text, response=response, body=body, type=type_, param=param)
