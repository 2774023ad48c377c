"""Graceful shutdown: on SIGTERM stop accepting, finish in-flight requests, exit 0.

``api/server.py`` runs uvicorn with its ``GracefulServer``. On SIGTERM (or SIGINT):

1. :class:`Lifecycle` flips to draining: ``api/middleware.py``'s ``DrainingMiddleware`` answers any
   request that still arrives (a keep-alive connection, a connection accepted a
   moment before) with 503 + ``Connection: close`` + ``Retry-After``;
2. uvicorn closes its listening sockets (new connections are refused) and waits
   up to ``shutdown_timeout_s`` for in-flight requests, rollouts included, to
   finish; past that they are cancelled (their rollouts aborted);
3. the app's lifespan shuts the engine down, and the process exits with 0 at
   once (``os._exit``: no interpreter teardown, see ``api/server.py``).

uvicorn re-raises a signal it handled once it has shut down; with the default
handlers that would end the process with -15 (SIGTERM) or 130 (SIGINT: Ctrl-C)
instead of 0, so ``api/server.py`` installs handlers that take that second delivery
as done and put the default back (a signal after that ends the process at once).
"""

from __future__ import annotations

import logging

__all__ = ["Lifecycle"]

logger = logging.getLogger(__name__)


class Lifecycle:
    """Whether the server is draining for shutdown (set from the signal handler)."""

    def __init__(self) -> None:
        self.draining = False

    def begin_drain(self, why: str) -> None:
        if not self.draining:
            logger.info("%s: draining (new requests get 503; in-flight ones finish)", why)
        self.draining = True
