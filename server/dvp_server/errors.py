"""The service's one error type, and validation errors put into words.

Services and engines raise :class:`ServiceError` (a status, a machine-readable
type, a message naming the field, the field's dotted path); nothing here knows
HTTP frameworks. ``api/errors.py`` turns it, and every other exception, into the
one error body (``{"error": {"type", "message", "param", "code"}}``) with its
status. :func:`describe_validation_errors` words pydantic's errors as
``(param, message)`` for both (a request body's 422, the OpenAI routes' checks).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "INVALID_REQUEST",
    "ServiceError",
    "describe_validation_errors",
    "validation_error",
]

INVALID_REQUEST = "invalid_request_error"
_MAX_REPORTED = 5  # validation errors listed in one message


class ServiceError(Exception):
    """A request the service refuses (or cannot serve), with its HTTP status.

    Args:
        status: HTTP status code (4xx for the request's fault, 5xx for ours).
        type: machine-readable kind, e.g. ``"invalid_request_error"``.
        message: what went wrong, naming the field.
        param: dotted path of the offending field (``"prompts.0.3"``), if any.
        headers: response headers the answer carries (``Retry-After``, ...).
    """

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.param = param
        self.headers = dict(headers or {})


def validation_error(param: str, message: str) -> ServiceError:
    """A 422 ``invalid_request_error`` naming ``param`` (the message is prefixed with it)."""
    return ServiceError(422, INVALID_REQUEST, f"{param}: {message}", param)


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
