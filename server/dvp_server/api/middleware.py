"""Every HTTP middleware of the app, and the stack in one ordered list.

:func:`middleware_stack` is the one place the order is written (outermost first):

==========================  ================================================================
middleware                  why it sits there
==========================  ================================================================
ReplicaHeader               stamps ``X-DVP-Replica`` on every answer (Ray Serve replicas only)
RequestId                   outermost of the rest: errors from every layer below carry the id
Metrics                     counts every answer, the refusals below included
Draining (503)              after SIGTERM nothing new starts, not even an auth check
Auth (401)                  before any body is read
EngineGate (503)            a dead or restarting engine refuses work before its body is read
BodyLimit (413, 408)        counts the raw bytes and bounds the time they take
MsgpackBody (``codecs``)    inside the limit: decodes what the limit let through
CatchAll (500)              innermost: an exception no handler took becomes a logged 500
==========================  ================================================================

(Body decoding off the event loop is not a middleware: ``bodies.py`` wraps the routes.)
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any

from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import ServerConfig
from ..errors import ServiceError
from ..service.lifecycle import Lifecycle
from ..service.metrics import Metrics
from .auth import AuthMiddleware
from .codecs import MsgpackBodyMiddleware
from .errors import error_response

__all__ = [
    "REPLICA_HEADER",
    "BodyLimitMiddleware",
    "CatchAllMiddleware",
    "DrainingMiddleware",
    "EngineGateMiddleware",
    "MetricsMiddleware",
    "ReplicaHeaderMiddleware",
    "RequestIdMiddleware",
    "middleware_stack",
]

REQUEST_ID_HEADER = "x-request-id"
REPLICA_HEADER = "x-dvp-replica"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
DRAIN_S = 5.0  # most time spent reading (and dropping) an over-limit body before the 413
SHUTDOWN_RETRY_AFTER_S = 5  # another replica (or this one, restarted) should be up by then


def middleware_stack(config: ServerConfig, metrics: Metrics, lifecycle: Lifecycle) -> list[Any]:
    """The app's middleware, outermost first (see the module table)."""
    return [
        Middleware(ReplicaHeaderMiddleware),
        Middleware(RequestIdMiddleware),
        Middleware(MetricsMiddleware, metrics=metrics),
        Middleware(DrainingMiddleware, lifecycle=lifecycle),
        Middleware(AuthMiddleware, api_key=config.api_key),
        Middleware(EngineGateMiddleware),
        Middleware(
            BodyLimitMiddleware,
            limit=config.max_request_bytes,
            read_timeout_s=config.read_timeout_s,
        ),
        Middleware(MsgpackBodyMiddleware),
        Middleware(CatchAllMiddleware),
    ]


def _app_state(scope: Scope, name: str) -> Any:
    """``scope["app"].state.<name>`` (set in the lifespan), or None."""
    return getattr(getattr(scope.get("app"), "state", None), name, None)


class ReplicaHeaderMiddleware:
    """Stamp every answer with ``X-DVP-Replica: <replica id>`` when ``app.state.fleet`` is
    set (``deploy/routes.py``); a single server passes through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fleet = _app_state(scope, "fleet")
        if scope["type"] != "http" or fleet is None:
            await self.app(scope, receive, send)
            return
        header = (REPLICA_HEADER.encode(), str(fleet.replica_id).encode())

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await self.app(scope, receive, stamped)


class RequestIdMiddleware:
    """Give every request an id (the client's ``X-Request-Id`` if well-formed, else
    ``req-<uuid4 hex>``), store it in ``request.state.request_id`` and echo it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == REQUEST_ID_HEADER.encode()),
            "",
        )
        request_id = given if _VALID_REQUEST_ID.fullmatch(given) else f"req-{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


class MetricsMiddleware:
    """Count every HTTP request by route template (not raw path), method and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.http_requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.http_latency.labels(route).observe(time.perf_counter() - t0)


class DrainingMiddleware:
    """While draining, answer every new request with 503 and close the connection."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.lifecycle.draining:
            await self.app(scope, receive, send)
            return
        headers = {"Retry-After": str(SHUTDOWN_RETRY_AFTER_S), "Connection": "close"}
        exc = ServiceError(
            503, "shutting_down", "the server is shutting down; retry elsewhere", None, headers
        )
        await error_response(exc)(scope, receive, send)


class EngineGateMiddleware:
    """Answer non-GET requests with 503 + Retry-After while the engine is not running.

    Reads ``app.state.supervisor`` (set in the lifespan); without one, passes through.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        supervisor = _app_state(scope, "supervisor")
        if (
            scope["type"] != "http"
            or scope["method"] in ("GET", "HEAD")
            or supervisor is None
            or supervisor.ready
        ):
            await self.app(scope, receive, send)
            return
        state, retry_after = supervisor.state, supervisor.retry_after_s()
        exc = ServiceError(
            503,
            "engine_unavailable",
            f"the {supervisor.engine.info.name} engine is {state} (retryable); "
            f"retry in {retry_after} s",
            None,
            {"Retry-After": str(retry_after)},
        )
        await error_response(exc)(scope, receive, send)


class _BodyError(HTTPException):
    """A body refused while it is read (FastAPI passes HTTPExceptions from body reading
    through); the connection is closed after the answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(status, detail, headers={"Connection": "close"})


class BodyLimitMiddleware:
    """Refuse a request body over ``limit`` bytes (413), or one that stalls (408).

    Size: a ``Content-Length`` over the limit is refused before the body is used; a
    body without one (chunked) is counted as it arrives and refused once it passes
    the limit, so no request can make the server buffer more. Either way the rest
    of the body is first read and dropped (up to :attr:`drain_bytes` more, for at
    most :data:`DRAIN_S` seconds, and not when the client waits for
    ``100 Continue``), so a client that is still sending reads the 413 instead of a
    connection reset.

    Time: while a body is incomplete, each read waits at most ``read_timeout_s``
    (``--read-timeout``); a client that stops sending gets a 408. Every refusal
    closes the connection. (Headers are bounded by the same timeout in the
    server's protocol, ``server.py``.)
    """

    def __init__(self, app: ASGIApp, limit: int, read_timeout_s: float = 30.0) -> None:
        self.app = app
        self.limit = limit
        self.read_timeout_s = read_timeout_s
        self.drain_bytes = max(limit, 16 << 20)

    def _too_large(self) -> _BodyError:
        return _BodyError(413, f"request body is over the limit of {self.limit} bytes")

    def _stalled(self, seen: int) -> _BodyError:
        return _BodyError(
            408,
            f"request body stalled: nothing arrived for {self.read_timeout_s:g} s after "
            f"{seen} bytes (--read-timeout)",
        )

    async def _drain(self, receive: Receive, budget: int) -> None:
        """Read and drop the rest of the body: at most ``budget`` bytes, :data:`DRAIN_S` s."""
        deadline = time.monotonic() + min(DRAIN_S, self.read_timeout_s)
        while budget >= 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                message = await asyncio.wait_for(receive(), left)
            except TimeoutError:
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            budget -= len(message.get("body", b""))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            if int(length) <= self.limit + self.drain_bytes and not headers.get(b"expect"):
                await self._drain(receive, self.limit + self.drain_bytes)
            await error_response(self._too_large())(scope, receive, send)
            return
        seen = 0
        complete = False
        started = False

        async def counted_receive() -> Message:
            nonlocal seen, complete
            if complete:  # after the body: the disconnect watchers wait as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except TimeoutError:
                raise self._stalled(seen) from None
            if message["type"] != "http.request":
                complete = True
                return message
            seen += len(message.get("body", b""))
            complete = not message.get("more_body", False)
            if seen > self.limit:
                if not complete:
                    await self._drain(receive, self.drain_bytes)
                raise self._too_large()
            return message

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, send_tracking)
        except _BodyError as exc:  # raised outside the routes (the msgpack decoder)
            if not started:
                await error_response(exc)(scope, receive, send)


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
