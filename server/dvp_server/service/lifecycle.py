"""Graceful shutdown: on SIGTERM stop accepting, finish in-flight requests, exit 0.

:func:`serve` runs uvicorn with :class:`GracefulServer`. On SIGTERM (or SIGINT):

1. :class:`Lifecycle` flips to draining: :class:`DrainingMiddleware` answers any
   request that still arrives (a keep-alive connection, a connection accepted a
   moment before) with 503 + ``Connection: close`` + ``Retry-After``;
2. uvicorn closes its listening sockets (new connections are refused) and waits
   up to ``shutdown_timeout_s`` for in-flight requests, rollouts included, to
   finish; past that they are cancelled (their rollouts aborted);
3. the app's lifespan shuts the engine down, and the process exits with 0 at
   once (``os._exit``: no interpreter teardown, see :func:`serve`).

uvicorn re-raises a signal it handled once it has shut down; with the default
handlers that would end the process with -15 (SIGTERM) or 130 (SIGINT: Ctrl-C)
instead of 0, so :func:`serve` installs handlers that take that second delivery
as done and put the default back (a signal after that ends the process at once).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from ..config import ServerConfig
from ..errors import ServiceError, error_response

__all__ = ["DrainingMiddleware", "GracefulServer", "Lifecycle", "serve"]

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 5  # another replica (or this one, restarted) should be up by then


class Lifecycle:
    """Whether the server is draining for shutdown (set from the signal handler)."""

    def __init__(self) -> None:
        self.draining = False

    def begin_drain(self, why: str) -> None:
        if not self.draining:
            logger.info("%s: draining (new requests get 503; in-flight ones finish)", why)
        self.draining = True


class DrainingMiddleware:
    """While draining, answer every new request with 503 and close the connection."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.lifecycle.draining:
            await self.app(scope, receive, send)
            return
        exc = ServiceError(503, "shutting_down", "the server is shutting down; retry elsewhere")
        response = error_response(exc)
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


class GracefulServer(uvicorn.Server):
    """uvicorn's server that tells the :class:`Lifecycle` when a shutdown signal comes."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.lifecycle.begin_drain(signal.Signals(sig).name)
        super().handle_exit(sig, frame)


def _ignore_redelivered(sig: int, frame: FrameType | None) -> None:
    """uvicorn re-raises the signal it handled; it was handled: only reset the default."""
    signal.signal(sig, signal.SIG_DFL)


def serve(app: Any, config: ServerConfig) -> None:
    """Run ``app`` (from ``create_app``) with uvicorn until SIGTERM / SIGINT (blocking).

    After a graceful shutdown the process exits with status 0 at once (``os._exit``);
    this returns only when the app never started (its startup failed).
    """
    lifecycle: Lifecycle = app.state.ops.lifecycle
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_graceful_shutdown=int(max(1, round(config.shutdown_timeout_s))),
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _ignore_redelivered)
    server = GracefulServer(uv_config, lifecycle)
    server.run()
    if server.started:  # served, drained, engine shut down: nothing is left to do
        # Interpreter teardown would only run garbage collections over every object
        # torch, transformers and vLLM made (9-140 s measured on a busy 2-core
        # machine) and print extension modules' leak reports: skip it.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
