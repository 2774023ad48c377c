"""Bounded admission of rollouts, and the gate that keeps weight updates atomic.

Every rollout the serving layer starts goes through :class:`AdmittedEngine`, a
thin wrapper of the real engine with the same protocol:

1. ``generate(...)`` *reserves* a slot at once (synchronously). At most
   ``capacity = max_batch + max_queue`` rollouts hold a slot; one more is refused
   with :class:`QueueFullError` (429 + ``Retry-After``), so a full server
   answers at once instead of queueing without bound. The serving layer fans a
   request's rollouts out together, so a refused rollout fails (and cancels)
   its whole request.
2. On its first ``__anext__`` the rollout *enters* through the gate and runs in
   the engine. While a weight update holds the gate closed, rollouts wait here
   (held, still counted against the capacity).
3. Its slot is released when the rollout finishes, fails, or its stream is
   closed (client gone).

A weight update runs inside :meth:`Admission.exclusive`: close the gate, either
wait until no admitted rollout is running (``drain``) or abort the running ones
first (``abort``: their last chunk gets ``finish_reason="abort"`` and an error
naming the update), then swap, then reopen. No rollout ever spans two weight
versions, and none is aborted silently.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..engines.base import Engine, EngineInfo, EngineParams, RolloutChunk
from ..errors import ServiceError

__all__ = [
    "RETRY_AFTER_S",
    "Admission",
    "AdmittedEngine",
    "DrainReport",
    "QueueFullError",
    "RolloutObserver",
    "Ticket",
]

logger = logging.getLogger(__name__)

#: Retry-After of a 429: a batch of short rollouts on a small model takes about
#: a second here; the client adds its own jitter-free wait of exactly this.
RETRY_AFTER_S = 1


class QueueFullError(ServiceError):
    """The rollout queue is full: 429 with ``Retry-After`` (the client retries)."""

    def __init__(self, admitted: int, capacity: int, retry_after_s: int = RETRY_AFTER_S) -> None:
        super().__init__(
            429,
            "rate_limit_error",
            f"the server's rollout queue is full ({admitted} of {capacity} rollouts admitted; "
            f"limit --max-batch + --max-queue); retry after {retry_after_s} s",
        )
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class Ticket:
    """One admitted rollout: its engine id and when it reserved / entered / ended."""

    request_id: str
    prompt_tokens: int
    reserved_at: float = field(default_factory=time.perf_counter)
    entered_at: float | None = None
    first_chunk_at: float | None = None
    abort_reason: str | None = None  # set when a weight update aborts it
    finish_reason: str | None = None
    released: bool = False


@dataclass
class DrainReport:
    """What :meth:`Admission.exclusive` waited for."""

    drained: int = 0  # rollouts running when the gate closed, left to finish
    aborted: int = 0  # rollouts the update aborted
    wait_s: float = 0.0  # seconds the gate was closed before the swap
    kept: int = 0  # rollouts that continued across the update (keep / recompute)


class RolloutObserver(Protocol):
    """Sees every admitted rollout (metrics)."""

    def on_chunk(self, ticket: Ticket, chunk: RolloutChunk) -> None: ...

    def on_end(self, ticket: Ticket) -> None: ...

    def on_rejected(self) -> None: ...


class Admission:
    """Slots (bounded) and the weight-update gate.

    Args:
        capacity: most rollouts admitted at once (``max_batch + max_queue``).
        retry_after_s: the ``Retry-After`` of a 429.

    Raises:
        ValueError: ``capacity < 1``.
    """

    def __init__(self, capacity: int, retry_after_s: int = RETRY_AFTER_S) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.reserved = 0
        self.running: set[Ticket] = set()
        self.observer: RolloutObserver | None = None
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._update_lock = asyncio.Lock()

    @property
    def held(self) -> int:
        """Admitted rollouts not (yet) running: waiting at the closed gate."""
        return self.reserved - len(self.running)

    @property
    def gate_open(self) -> bool:
        return self._open.is_set()

    def reserve(self, request_id: str, prompt_tokens: int) -> Ticket:
        """Take a slot now, or refuse.

        Raises:
            QueueFullError: ``capacity`` rollouts are admitted already.
        """
        if self.reserved >= self.capacity:
            if self.observer is not None:
                self.observer.on_rejected()
            raise QueueFullError(self.reserved, self.capacity, self.retry_after_s)
        self.reserved += 1
        return Ticket(request_id, prompt_tokens)

    async def enter(self, ticket: Ticket) -> None:
        """Wait for the gate, then count the rollout as running."""
        while not self._open.is_set():
            await self._open.wait()
        ticket.entered_at = time.perf_counter()
        self.running.add(ticket)
        self._idle.clear()

    def leave(self, ticket: Ticket) -> None:
        """End a gated call that took no slot (:meth:`AdmittedEngine.score`)."""
        self.running.discard(ticket)
        if not self.running:
            self._idle.set()

    def release(self, ticket: Ticket) -> None:
        """Give the slot back (idempotent) and tell the observer."""
        if ticket.released:
            return
        ticket.released = True
        self.reserved -= 1
        self.running.discard(ticket)
        if not self.running:
            self._idle.set()
        if self.observer is not None:
            self.observer.on_end(ticket)

    @asynccontextmanager
    async def exclusive(
        self,
        *,
        abort_reason: str | None,
        abort: Callable[[str], Awaitable[None]],
        timeout_s: float,
    ) -> AsyncIterator[DrainReport]:
        """Hold the gate closed with no rollout running; updates run one at a time.

        Args:
            abort_reason: None to drain (wait for running rollouts); else abort them
                first, with this message in their last chunk's error.
            abort: the engine's ``abort(request_id)``.
            timeout_s: longest wait for the running rollouts to end.

        Raises:
            ServiceError: 409 when they did not end in ``timeout_s`` (the gate reopens,
                nothing changed).
        """
        async with self._update_lock:
            t0 = time.perf_counter()
            self._open.clear()
            report = DrainReport()
            try:
                running = list(self.running)
                if abort_reason is None:
                    report.drained = len(running)
                else:
                    for ticket in running:
                        ticket.abort_reason = abort_reason
                        await abort(ticket.request_id)
                try:
                    await asyncio.wait_for(self._idle.wait(), timeout_s)
                except asyncio.TimeoutError:
                    raise ServiceError(
                        409,
                        "conflict_error",
                        f"weights: {len(self.running)} in-flight rollouts did not finish "
                        f"within {timeout_s:g} s; nothing was changed (retry later, or "
                        "use on_inflight='abort')",
                        "drain_timeout_s",
                    ) from None
                report.aborted = sum(1 for t in running if t.finish_reason == "abort")
                report.wait_s = time.perf_counter() - t0
                yield report
            finally:
                self._open.set()

    @asynccontextmanager
    async def in_flight_update(self) -> AsyncIterator[DrainReport]:
        """An update that leaves the gate open (``keep`` / ``recompute``): running
        rollouts continue across it and new ones are admitted; updates still run one
        at a time. The report counts the rollouts in flight at the start (none
        drained or aborted; ``wait_s`` is the wait for an earlier update)."""
        t0 = time.perf_counter()
        async with self._update_lock:
            report = DrainReport()
            report.wait_s = time.perf_counter() - t0
            report.kept = len(self.running)
            yield report


class AdmittedEngine:
    """The engine behind admission: same protocol, every rollout takes a slot.

    Other attributes (engine stats, ``model_dir``, ``load_weights``, ...) are the
    wrapped engine's.

    Args:
        engine: the real engine (started).
        admission: the slots and the gate.
    """

    def __init__(self, engine: Engine, admission: Admission) -> None:
        self.engine = engine
        self.admission = admission

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    @property
    def policy_version(self) -> int:
        return self.engine.policy_version

    @property
    def state(self) -> str:
        return self.engine.state

    async def start(self) -> None:
        await self.engine.start()

    async def shutdown(self) -> None:
        await self.engine.shutdown()

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    async def score(self, *args: Any, **kwargs: Any) -> Any:
        """The engine's ``score``, through the gate: never across a weight swap, and a
        draining update waits for it (it takes no slot: scoring is one forward)."""
        ticket = Ticket("score", 0)
        await self.admission.enter(ticket)
        try:
            return await self.engine.score(*args, **kwargs)  # type: ignore[attr-defined]
        finally:
            self.admission.leave(ticket)

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: EngineParams
    ) -> AsyncIterator[RolloutChunk]:
        """The engine's stream of one rollout, admitted.

        Raises:
            QueueFullError: at once (not on iteration) when no slot is free.
        """
        ticket = self.admission.reserve(request_id, len(prompt_token_ids))
        return _AdmittedStream(self, ticket, prompt_token_ids, params)


class _AdmittedStream:
    """Async iterator over one admitted rollout; releases its slot exactly once."""

    def __init__(
        self, owner: AdmittedEngine, ticket: Ticket, prompt: list[int], params: EngineParams
    ) -> None:
        self._owner = owner
        self._ticket = ticket
        self._prompt = prompt
        self._params = params
        self._inner: AsyncIterator[RolloutChunk] | None = None

    def __aiter__(self) -> _AdmittedStream:
        return self

    async def __anext__(self) -> RolloutChunk:
        admission, ticket = self._owner.admission, self._ticket
        if ticket.released:
            raise StopAsyncIteration
        try:
            if self._inner is None:
                await admission.enter(ticket)
                engine = self._owner.engine
                self._inner = engine.generate(ticket.request_id, self._prompt, self._params)
            chunk = await self._inner.__anext__()
        except BaseException as exc:  # error, end of stream or cancellation: the slot goes back
            if not isinstance(exc, (StopAsyncIteration, asyncio.CancelledError, GeneratorExit)):
                ticket.finish_reason = ticket.finish_reason or "error"
            admission.release(ticket)
            raise
        if ticket.first_chunk_at is None:
            ticket.first_chunk_at = time.perf_counter()
        if chunk.finish_reason == "abort" and ticket.abort_reason and chunk.error is None:
            chunk.error = ticket.abort_reason
        if admission.observer is not None:
            admission.observer.on_chunk(ticket, chunk)
        if chunk.finish_reason is not None:
            ticket.finish_reason = chunk.finish_reason
            admission.release(ticket)
        return chunk

    async def aclose(self) -> None:
        """Close the engine stream (aborting an unfinished rollout) and release the slot."""
        try:
            aclose = getattr(self._inner, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            self._owner.admission.release(self._ticket)

    def __del__(self) -> None:  # a stream dropped without aclose must not leak its slot
        if not self._ticket.released:
            self._owner.admission.release(self._ticket)
