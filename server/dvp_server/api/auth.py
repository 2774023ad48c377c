"""Bearer-key auth: all routes but ``/health`` and ``/ready`` need ``Authorization: Bearer``.

On when the server has a key (``--api-key`` or ``DVP_API_KEY``). A missing or
wrong key gets a 401 error envelope with ``WWW-Authenticate: Bearer`` before the
body is read. Keys are compared in constant time (:func:`hmac.compare_digest`
on the UTF-8 bytes), so the answer time does not tell how much of a guess was
right.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ServiceError
from .errors import error_response

__all__ = ["OPEN_PATHS", "AuthMiddleware", "bearer_token"]

#: Paths served without a key: liveness and readiness probes must work without secrets.
OPEN_PATHS = frozenset({"/health", "/ready"})


def bearer_token(authorization: bytes) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else None."""
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()


class AuthMiddleware:
    """Refuse requests without the API key (401); ``api_key`` None lets all through.

    Args:
        app: the ASGI app inside.
        api_key: the key; None disables auth.
    """

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        token = bearer_token(header) if header is not None else None
        if token is not None and hmac.compare_digest(token, self.key):
            await self.app(scope, receive, send)
            return
        why = "missing" if header is None else "invalid"
        exc = ServiceError(
            401,
            "authentication_error",
            f"{why} API key: send 'Authorization: Bearer <key>' (the server's --api-key / "
            "DVP_API_KEY)",
            None,
            {"WWW-Authenticate": "Bearer"},
        )
        await error_response(exc)(scope, receive, send)
