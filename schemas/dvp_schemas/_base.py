"""Base classes for the wire models: strict requests, tolerant responses."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RequestModel(BaseModel):
    """A request body. Unknown fields are rejected: we own both ends, so a stray
    field is a bug, and the 422 names it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ResponseModel(BaseModel):
    """A response body. Unknown fields are ignored, so an older client survives a
    newer server."""

    model_config = ConfigDict(extra="ignore")
