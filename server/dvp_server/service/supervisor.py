"""Engine supervision: restart a dead engine, and answer 503 while it is down.

The engine can die under the service (vLLM: its ``EngineCore`` process killed
or crashed; ``AsyncLLM.errored`` then holds and every stream raises
``EngineDeadError``). What follows, all driven from here:

1. In-flight rollouts fail at once with :class:`~.engines.base.EngineError`
   (the engine adapter maps vLLM's error), so their requests end with 503
   ``engine_error`` (retryable; ``errors.py``): never a hang, never a
   truncated rollout (the serving layer fails the whole request).
2. :class:`EngineSupervisor` polls ``engine.state`` every ``poll_s`` in a
   background task of the app lifespan. On ``'dead'`` it reports
   ``'restarting'`` and makes up to ``max_restarts`` attempts, each after a
   backoff of ``backoff_s * 2**(attempt - 1)`` seconds (capped at
   :data:`MAX_BACKOFF_S`), each logged: ``engine.shutdown()`` (releases the dead
   engine's processes and sockets) then ``engine.start()`` (same settings).
   After the last failure the state stays ``'dead'``; nothing restarts it but
   a new process (the orchestrator's job: ``/ready`` stays false).
3. ``api/middleware.py``'s ``EngineGateMiddleware`` answers every non-GET request with 503 +
   ``Retry-After`` while the supervisor is not ``'running'``: the estimated
   seconds until the engine is back (the last start's duration, from the
   coming attempt), so a client's retry lands after the restart. GET routes
   (``/health``, ``/ready``, ``/metrics``, ``/v1/models``) keep answering.

A seeded rollout request is safe to repeat (same seeds, same samples), so the
client's retries carry the trainer's call through a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

from ..engines.base import Engine

__all__ = ["EngineSupervisor"]

logger = logging.getLogger(__name__)

POLL_S = 0.25  # how often the engine state is read
MAX_BACKOFF_S = 30.0  # longest wait before an attempt
RETRY_AFTER_DEAD_S = 30  # Retry-After once restarts are exhausted (another replica)
MAX_RETRY_AFTER_S = 60  # clients cap Retry-After at 60 s anyway


class EngineSupervisor:
    """Watch one engine and restart it when it dies (bounded, with backoff).

    Args:
        engine: the engine (not yet started; :meth:`start` starts it).
        max_restarts: attempts per death; 0 never restarts.
        backoff_s: wait before the first attempt; doubled per attempt.
        on_attempt: called after each attempt with ``"ok"`` or ``"failed"`` (metrics).
        poll_s: seconds between two reads of ``engine.state``.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_restarts: int,
        backoff_s: float,
        on_attempt: Callable[[str], None] | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        if not backoff_s >= 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s}")
        self.engine = engine
        self.max_restarts = max_restarts
        self.backoff_s = backoff_s
        self.on_attempt = on_attempt
        self.poll_s = poll_s
        #: Successful restarts since the server started.
        self.restarts = 0
        self._restarting = False
        self._gave_up = False
        self._start_s = 0.0  # duration of the last successful start
        self._next_try_at = 0.0  # time.monotonic() of the coming attempt
        self._task: asyncio.Task[None] | None = None

    @property
    def state(self) -> str:
        """The engine's state, or ``'restarting'`` while attempts are under way."""
        if self._restarting:
            return "restarting"
        return self.engine.state

    @property
    def ready(self) -> bool:
        """Whether the engine serves requests now (``GET /ready``)."""
        return self.state == "running"

    def retry_after_s(self) -> int:
        """Seconds a refused client should wait: the estimated time to the engine's return.

        While restarting, ``attempt time + last start duration - now`` (the engine is
        expected back then); once past that estimate, a quarter of the start duration
        (the start runs late: retry soon, not at once). Clipped to ``[1,
        MAX_RETRY_AFTER_S]``; :data:`RETRY_AFTER_DEAD_S` once restarts are exhausted.
        """
        if self._gave_up or (self.max_restarts == 0 and self.state == "dead"):
            return RETRY_AFTER_DEAD_S
        wait = self._next_try_at + self._start_s - time.monotonic()
        if wait < 1:
            wait = self._start_s / 4
        return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(wait))))

    async def start(self) -> None:
        """Start the engine (timed: the restart estimate) and the watch task.

        Raises:
            Exception: whatever the engine's first ``start`` raises (not retried:
                a server that cannot start at all should fail loudly).
        """
        await self._timed_start()
        self._task = asyncio.create_task(self._watch(), name="dvp-engine-supervisor")

    async def stop(self) -> None:
        """Stop watching (before the engine's own shutdown); idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _timed_start(self) -> None:
        t0 = time.monotonic()
        await self.engine.start()
        self._start_s = time.monotonic() - t0

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            if self.engine.state == "dead" and not self._gave_up:
                await self.restart()

    async def restart(self) -> bool:
        """Attempt up to ``max_restarts`` restarts of the dead engine; whether one worked.

        Each attempt waits its backoff, then ``shutdown()`` + ``start()``; an
        attempt fails when either raises or the engine is not ``'running'`` after.
        """
        name = self.engine.info.name
        self._restarting = True
        try:
            for attempt in range(1, self.max_restarts + 1):
                delay = min(MAX_BACKOFF_S, self.backoff_s * 2 ** (attempt - 1))
                logger.warning(
                    "the %s engine is dead: restart attempt %d of %d in %.1f s",
                    name, attempt, self.max_restarts, delay,
                )  # fmt: skip
                self._next_try_at = time.monotonic() + delay
                await asyncio.sleep(delay)
                if await self._attempt(attempt):
                    return True
        finally:
            self._restarting = False
        self._gave_up = True
        logger.error(
            "the %s engine stays dead after %d restart attempt(s); /ready stays false",
            name, self.max_restarts,
        )  # fmt: skip
        return False

    async def _attempt(self, attempt: int) -> bool:
        name = self.engine.info.name
        try:
            await self.engine.shutdown()
            await self._timed_start()
        except Exception:
            logger.exception("restart attempt %d of the %s engine failed", attempt, name)
            ok = False
        else:
            ok = self.engine.state == "running"
            if not ok:
                logger.error(
                    "restart attempt %d: the %s engine is %r after start()",
                    attempt, name, self.engine.state,
                )  # fmt: skip
        if self.on_attempt is not None:
            self.on_attempt("ok" if ok else "failed")
        if ok:
            self.restarts += 1
            logger.warning(
                "the %s engine is back after restart attempt %d (start took %.1f s)",
                name, attempt, self._start_s,
            )  # fmt: skip
        return ok
