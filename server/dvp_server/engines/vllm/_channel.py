"""The API process's end of the step channel from :mod:`._processor`.

The processor runs in vLLM's EngineCore process and PUSHes, once per sampler
call, a pickled list of step records ``(key, step, |S|, log Z_S, ids, score)``
(:func:`._processor.step_records`) to a ZeroMQ IPC socket that this process
binds in a private temporary folder (mode 0700: only this user can connect;
pickle is only read from there). A reader task files each record under its key
(a rollout's unique key, never reused, so a late record of an aborted or
restarted request can never land in another one: records for unknown keys are
dropped) and step (a step sent twice, after a preemption, is overwritten).

A rollout registers its key before it is submitted to vLLM and waits, for each
output vLLM hands back, until the records of those steps are there (they are
sent before the step's token is sampled, on another socket, so they are
normally there already), then takes them. It unregisters in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = ["StepChannel", "StepTimeout"]

logger = logging.getLogger(__name__)

#: Longest wait for a step record once vLLM returned the step's token.
RECORD_TIMEOUT_S = 60.0


class StepTimeout(RuntimeError):
    """A step's record did not arrive (the engine's processor failed or dropped it)."""


@dataclass
class _Entry:
    records: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    event: asyncio.Event = field(default_factory=asyncio.Event)


class StepChannel:
    """Bound PULL socket + reader task; per-key step records (module docstring)."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="dvp-steps-")
        os.chmod(self._dir, 0o700)
        self.addr = f"ipc://{self._dir}/steps-{uuid.uuid4().hex[:8]}"
        self._entries: dict[str, _Entry] = {}
        self._sock: Any = None
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0  # records for unknown keys (aborted, finished)

    async def start(self) -> None:
        """Bind the socket and start the reader (call from the serving loop)."""
        import zmq
        import zmq.asyncio

        if self._task is not None:
            return
        self._sock = zmq.asyncio.Context.instance().socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.bind(self.addr)
        self._task = asyncio.create_task(self._read(), name="dvp-step-channel")

    async def close(self) -> None:
        """Stop the reader, close the socket, remove the folder; wake every waiter."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for entry in self._entries.values():
            entry.event.set()
        shutil.rmtree(self._dir, ignore_errors=True)

    def register(self, key: str) -> None:
        """Start collecting the records of ``key`` (before submitting it to vLLM)."""
        self._entries[key] = _Entry()

    def unregister(self, key: str) -> None:
        """Forget ``key`` and its remaining records."""
        self._entries.pop(key, None)

    async def take(self, key: str, start: int, stop: int) -> list[tuple[Any, ...]]:
        """The records of steps ``[start, stop)`` of ``key``, removed; waits for them.

        Raises:
            StepTimeout: they did not all arrive within ``RECORD_TIMEOUT_S``, or the
                channel closed.
        """
        entry = self._entries[key]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECORD_TIMEOUT_S
        while not all(s in entry.records for s in range(start, stop)):
            if self._task is None:
                raise StepTimeout("the step channel is closed")
            entry.event.clear()
            left = deadline - loop.time()
            try:
                await asyncio.wait_for(entry.event.wait(), timeout=max(left, 0.0))
            except TimeoutError as exc:
                missing = [s for s in range(start, stop) if s not in entry.records]
                raise StepTimeout(
                    f"no safe-set record for steps {missing[:5]} of {key} after "
                    f"{RECORD_TIMEOUT_S:.0f} s"
                ) from exc
        return [entry.records.pop(s) for s in range(start, stop)]

    async def _read(self) -> None:
        sock = self._sock
        while True:
            data = await sock.recv()
            try:
                records = pickle.loads(data)
            except Exception:
                logger.exception("unreadable DVP step message (%d bytes)", len(data))
                continue
            woken: set[str] = set()
            for rec in records:
                entry = self._entries.get(rec[0])
                if entry is None:
                    self.dropped += 1
                    continue
                entry.records[int(rec[1])] = rec
                woken.add(rec[0])
            for key in woken:
                self._entries[key].event.set()
