"""The one error body every route returns: ``{"error": {type, message, param, code}}``."""

from __future__ import annotations

from pydantic import Field

from ._base import ResponseModel


class ErrorInfo(ResponseModel):
    type: str = Field(description="Machine-readable kind, e.g. 'invalid_request_error'.")
    message: str = Field(description="What went wrong, naming the offending field.")
    param: str | None = Field(None, description="Dotted path of the offending field, if any.")
    code: int = Field(description="The HTTP status code, repeated in the body.")


class ErrorResponse(ResponseModel):
    error: ErrorInfo
