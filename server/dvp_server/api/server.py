"""The HTTP server: uvicorn with a graceful shutdown and a bound on slow headers.

:func:`serve` runs the app until SIGTERM / SIGINT, drains (``service/lifecycle.py``
says how) and exits 0. Its protocol (:func:`bounded_protocol`) is uvicorn's own
with one addition: a connection whose request headers are not complete
``read_timeout_s`` after it opened (or after its previous answer) is closed, so
clients that send their headers byte by byte cannot hold connections forever
(uvicorn bounds no part of a request in time). The body's time is bounded in
``middleware.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from ..config import ServerConfig
from ..service.lifecycle import Lifecycle

__all__ = ["GracefulServer", "bounded_protocol", "serve"]


def bounded_protocol(read_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, closing connections whose headers take over ``read_timeout_s``."""
    base: Any = AutoHTTPProtocol

    class BoundedHeaders(base):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request's headers get the same time

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(read_timeout_s, self._headers_overdue)

        def _headers_overdue(self) -> None:
            # no request under way (headers incomplete, or an idle keep-alive): close
            idle = self.cycle is None or self.cycle.response_complete
            if idle and not self.transport.is_closing():
                self.transport.close()

    return BoundedHeaders


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
        http=bounded_protocol(config.read_timeout_s),
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
