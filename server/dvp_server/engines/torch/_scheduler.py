"""The torch engine's scheduler thread: admission into the batch, prefill, decode, emit.

One thread owns the model. Each loop turn it takes the rollouts it may start
and runs one forward + rule step:

- no batch running: wait a short arrival window (a request's samples arrive one
  coroutine at a time), then prefill up to ``max_batch`` pending rows as a new
  batch;
- a batch running (continuous batching): pending rows fill its free slots
  without waiting for it to finish: they are prefilled as their own left-padded
  mini-batch, their first token sampled, and their KV cache merged into the
  running batch's (:meth:`~._batch.DecodeBatch.merge`); the next turn decodes
  everybody. A prefill turn is always followed by a decode turn, so a stream of
  arrivals cannot starve the running rows; into a batch at least half full,
  newcomers come in groups (``MERGE_GROUP``, at most ``MERGE_WAIT_STEPS`` steps
  of waiting), since each prefill forward reads every weight.

KV budget: a row's cache costs ``bytes_per_token = 2 * layers * kv_heads *
head_dim * dtype bytes`` per position (keys and values of every layer), and a
left-padded batch holds ``B * K`` positions with ``K <= max_i final_len_i``
(``final_len = min(prompt + max_tokens, max_model_len)``), in buffers with
``slack`` positions of room to grow (``SlackLayer``). The scheduler admits a row
only while ``B * (max final_len + slack) * bytes_per_token`` stays within the
budget, so the cache never grows past it (a buffer reallocation or a merge
briefly holds the old and the new copy of one layer or of the cache); rows that
do not fit wait in the engine's queue (bounded by the server's admission: a
full queue answers 429).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from dvp_schemas import FinishReason

from ...errors import INVALID_REQUEST, ServiceError
from ..base import PolicyVersion
from ._batch import DecodeBatch
from ._prefix import PrefixCache
from ._rows import Row
from ._rule_step import StepOutput, rule_step

__all__ = ["EngineStats", "KvBudget", "KvBudgetError", "SchedulerMixin"]

logger = logging.getLogger(__name__)

StepHook = Callable[[Sequence[str]], None]


@dataclass
class EngineStats:
    """Cumulative scheduler counters (wall seconds spent in the scheduler thread)."""

    batches: int = 0  # batches started with no batch running
    prefills: int = 0  # prefill forwards (new batches and mid-batch admissions)
    merged: int = 0  # rows admitted into a running batch
    steps: int = 0  # forward + rule steps (a prefill counts as one)
    tokens: int = 0  # tokens sampled
    forward_s: float = 0.0  # model forwards (prefill and decode)
    rule_s: float = 0.0  # rule, sampling, log-probs, safe ids: the DVP metadata
    emit_s: float = 0.0  # bookkeeping: buffers, finish checks, chunks, cache merges
    kv_peak_bytes: int = 0  # largest KV cache held (B * K positions, padding included)
    prefill_tokens: int = 0  # positions run through prefill forwards (shared prefixes once)


class KvBudgetError(ServiceError, ValueError):
    """A rollout that cannot fit the KV budget even alone: a ValueError for library
    callers, a 422 naming ``sampling.max_tokens`` for the server (retrying cannot help)."""

    def __init__(self, message: str) -> None:
        param = "sampling.max_tokens"
        super().__init__(422, INVALID_REQUEST, f"{param}: {message}", param)


class KvBudget:
    """KV cache size per position and the bound the scheduler keeps.

    Args:
        config: the model's transformers config (layers, kv heads, head dim).
        dtype: the cache dtype (the model's).
        budget_bytes: most KV cache bytes of the running batch; None: no bound
            beyond ``max_batch * max_model_len`` positions.

    Raises:
        ValueError: a budget below one byte.
    """

    def __init__(
        self, config: Any, dtype: torch.dtype, budget_bytes: int | None, slack: int = 0
    ) -> None:
        if budget_bytes is not None and budget_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be >= 1, got {budget_bytes}")
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        #: ``2 * layers * kv_heads * head_dim * itemsize``: keys and values, every layer.
        self.bytes_per_token = 2 * int(config.num_hidden_layers) * kv_heads * head_dim
        self.bytes_per_token *= torch.tensor([], dtype=dtype).element_size()
        self.budget_bytes = budget_bytes
        #: Positions a cache buffer may hold beyond its rows' (``SlackLayer.SLACK``).
        self.slack = slack

    def fits(self, rows: int, longest: int) -> bool:
        """Whether ``rows`` rows whose longest final length is ``longest`` fit the budget:
        ``rows * (longest + slack) * bytes_per_token <= budget``."""
        if self.budget_bytes is None:
            return True
        return rows * (longest + self.slack) * self.bytes_per_token <= self.budget_bytes


class SchedulerMixin:
    """The scheduler thread's half of :class:`~.torch_engine.TorchEngine`.

    The engine sets every attribute declared here in its ``__init__``.
    """

    model: Any
    pad_id: int
    max_batch: int
    max_model_len: int
    flush_every: int
    threads: int
    continuous_batching: bool
    kv: KvBudget
    prefixes: PrefixCache | None
    stats: EngineStats
    step_hook: StepHook | None
    on_step: Callable[[int], None] | None
    _cond: threading.Condition
    _pending: deque[Row]
    _rows: dict[str, Row]
    _aborts: set[Row]
    _batch: DecodeBatch | None
    _last_tokens: np.ndarray
    _stopping: bool
    _state: str
    _version: PolicyVersion
    _model_lock: threading.Lock
    _prefilled_last: bool

    #: Quiet time that closes the arrival window of a new batch, and its round cap.
    ADMIT_WINDOW_S = 0.005
    ADMIT_ROUNDS = 20
    #: Into a running batch at least half full, newcomers are admitted in groups of
    #: ``MERGE_GROUP * max_batch`` (or the free slots), waiting at most
    #: ``MERGE_WAIT_STEPS`` decode steps: every prefill forward reads all the
    #: weights and holds up the running rows, so one per newcomer costs too much.
    MERGE_GROUP = 0.25
    MERGE_WAIT_STEPS = 8
    _deferred = 0  # decode turns that left pending rows out while slots were free

    def final_len(self, row: Row) -> int:
        """Most cache positions ``row`` can reach: ``min(prompt + max_tokens, max_model_len)``."""
        return min(len(row.prompt) + row.params.max_tokens, self.max_model_len)

    def _finish(
        self, row: Row, reason: FinishReason, stop: str | int | None, error: str | None = None
    ) -> None:
        """Emit a row's last chunk and forget it (call with ``_cond`` held or from the thread)."""
        self._rows.pop(row.request_id, None)  # first: the chunk may wake the caller at once
        row.emit(row.take_chunk(reason, stop, error=error, policy_version=self._version.value))

    def _run(self) -> None:
        """Scheduler thread: admit, step, repeat; never lets a step's error escape.

        A step's error fails its batch only (``_step``). An error anywhere else
        ends the thread (the engine's state turns 'dead', the supervisor restarts
        it), but first fails every row it held, so no caller waits forever.
        """
        reason: FinishReason = "abort"
        error: str | None = None
        try:
            self._loop()
        except Exception as exc:
            logger.exception("torch engine scheduler died")
            reason, error = "error", f"scheduler died: {type(exc).__name__}: {exc}"
            self._state = "dead"  # before the rows fail: no new row is accepted
        with self._cond:
            for row in list(self._rows.values()):
                self._finish(row, reason, None, error=error)
            self._pending.clear()
            self._batch = None

    def _loop(self) -> None:
        torch.set_num_threads(self.threads)  # intra-op threads of this thread's work
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self._pending and self._batch is None:
                        self._cond.wait()
                    if self._stopping:
                        return
                    if self._batch is None:
                        self._collect_arrivals()
                    new_rows = self._admit()
                    aborts, self._aborts = self._aborts, set()
                with self._model_lock:
                    self._step(new_rows, aborts)

    def _collect_arrivals(self) -> None:
        """Before a new batch, wait while rollouts keep arriving (call with ``_cond`` held).

        A request's samples are submitted one coroutine at a time; without this
        window the first one would start a batch alone and the rest would join it
        one prefill at a time. Waits at most ``ADMIT_ROUNDS`` windows.
        """
        for _ in range(self.ADMIT_ROUNDS):
            n = len(self._pending)
            if n >= self.max_batch or self._stopping:
                return
            self._cond.wait(self.ADMIT_WINDOW_S)
            if len(self._pending) == n:
                return

    def _admit(self) -> list[Row]:
        """Pending rows that start now, first come first served (call with ``_cond`` held).

        Up to the batch's free slots, while the KV budget holds; into a running
        batch only with continuous batching on, and never twice in a row.
        """
        batch = self._batch
        if batch is not None and (not self.continuous_batching or self._prefilled_last):
            return []
        running = batch.rows if batch is not None else []
        if batch is not None and self._defer(len(running)):
            return []
        longest = max((self.final_len(r) for r in running), default=0)
        out: list[Row] = []
        while self._pending and len(running) + len(out) < self.max_batch:
            longer = max(longest, self.final_len(self._pending[0]))
            if not self.kv.fits(len(running) + len(out) + 1, longer):
                break
            out.append(self._pending.popleft())
            longest = longer
        return out

    def _defer(self, running: int) -> bool:
        """Whether pending rows wait for more company before joining a running batch."""
        free = self.max_batch - running
        group = min(free, max(1, int(self.MERGE_GROUP * self.max_batch)))
        if not self._pending or free <= 0:
            self._deferred = 0
            return True
        if (
            len(self._pending) < group
            and running >= self.max_batch // 2
            and self._deferred < self.MERGE_WAIT_STEPS
        ):
            self._deferred += 1
            return True
        self._deferred = 0
        return False

    def _step(self, new_rows: list[Row], aborts: set[Row]) -> None:
        """Drop aborted rows, then prefill the newcomers, or else decode the batch."""
        if aborts and self._batch is not None:
            self._drop(self._batch, aborts)
        live = [r for r in new_rows if r not in aborts]
        if live:
            self._prefill(live)
        elif self._batch is not None:
            self._decode(self._batch)

    def _prefill(self, rows: list[Row]) -> None:
        """Prefill ``rows`` as a mini-batch, sample their first token, join the running batch."""
        mini = DecodeBatch(self.model, rows, self.pad_id, slack=self.kv.slack)
        for r in rows:
            r.kv_version = self._version.value
        try:
            self._call_hook(mini)
            t0 = time.perf_counter()
            logits = mini.prefill(self.prefixes)
            self.stats.prefill_tokens += mini.prefilled
            out = self._rule(mini, logits, t0)
            self.stats.prefills += 1
            if self._batch is None:
                self.stats.batches += 1
            t2 = time.perf_counter()
            tokens = self._emit_step(mini, out)
        except Exception as exc:  # a failed prefill fails its own rows only
            self._fail(rows, exc, drop_batch=self._batch is None)
            return
        if not mini.rows:  # every newcomer finished at its first token
            return
        if self._batch is None:
            self._batch, self._last_tokens = mini, tokens
        else:
            try:
                self._batch.merge(mini)
            except Exception as exc:  # a half-merged cache: fail both sides
                self._fail(self._batch.rows + mini.rows, exc)
                return
            self._last_tokens = np.concatenate([self._last_tokens, tokens])
            self.stats.merged += len(mini.rows)
        self._prefilled_last = True
        self._note_kv(self._batch)
        self.stats.emit_s += time.perf_counter() - t2

    def _recompute(self) -> None:
        """Prefill every running row's context (prompt + tokens but the last) again with
        the weights now loaded, replacing the batch's keys / values (call under the
        model lock, between two steps). The last sampled tokens stay the next inputs.
        """
        batch = self._batch
        if batch is None:
            return
        contexts = [r.prompt + r.generated[:-1] for r in batch.rows]
        fresh = DecodeBatch(self.model, batch.rows, self.pad_id, slack=self.kv.slack)
        fresh.prefill_contexts(contexts)
        for r in batch.rows:
            r.kv_version = self._version.value
        self._batch = fresh
        self._prefilled_last = True
        self._note_kv(fresh)

    def _decode(self, batch: DecodeBatch) -> None:
        """One decode step of the running batch."""
        try:
            self._call_hook(batch)
            t0 = time.perf_counter()
            logits = batch.decode(self._last_tokens)
            out = self._rule(batch, logits, t0)
            t2 = time.perf_counter()
            self._last_tokens = self._emit_step(batch, out)
            self._prefilled_last = False
            self._note_kv(batch)
            if not batch.rows:
                self._batch = None
            self.stats.emit_s += time.perf_counter() - t2
        except Exception as exc:  # a failed step fails its batch, not the engine
            self._fail(batch.rows, exc)

    def _rule(self, batch: DecodeBatch, logits: torch.Tensor, t0: float) -> StepOutput:
        """The rule step on a forward's logits, timed and counted."""
        t1 = time.perf_counter()
        out = rule_step(logits, batch.rows, batch.rule())
        self.stats.forward_s += t1 - t0
        self.stats.rule_s += time.perf_counter() - t1
        self.stats.steps += 1
        self.stats.tokens += len(batch.rows)
        if self.on_step is not None:
            self.on_step(len(batch.rows))
        return out

    def _fail(self, rows: list[Row], exc: Exception, drop_batch: bool = True) -> None:
        """End ``rows`` with finish_reason 'error'; forget the running batch if asked."""
        logger.exception("torch engine step failed")
        msg = f"{type(exc).__name__}: {exc}"
        with self._cond:
            for r in rows:
                if not r.done:
                    self._finish(r, "error", None, error=msg)
        if drop_batch:
            self._batch = None
            self._prefilled_last = False

    def _note_kv(self, batch: DecodeBatch | None) -> None:
        if batch is not None:
            held = batch.cached_positions * self.kv.bytes_per_token
            self.stats.kv_peak_bytes = max(self.stats.kv_peak_bytes, held)

    def _call_hook(self, batch: DecodeBatch) -> None:
        if self.step_hook is not None:
            self.step_hook([r.request_id for r in batch.rows])

    def _drop(self, batch: DecodeBatch, aborts: set[Row]) -> None:
        keep = []
        for i, r in enumerate(batch.rows):
            if r in aborts:
                with self._cond:
                    self._finish(r, "abort", None)
            else:
                keep.append(i)
        self._last_tokens = self._last_tokens[keep]
        if keep:
            batch.keep(keep)
        else:
            self._batch = None
            self._prefilled_last = False

    def _emit_step(self, batch: DecodeBatch, out: StepOutput) -> np.ndarray:
        """Record a step in every row, emit due chunks, drop finished rows from ``batch``.

        Returns:
            int64 ``(B',)``: the sampled tokens of the rows still in ``batch``.
        """
        keep: list[int] = []
        for i, row in enumerate(batch.rows):
            token = int(out.tokens[i])
            row.record(
                token,
                float(out.logprobs[i]),
                float(out.masked[i]),
                float(out.logmass[i]),
                int(out.sizes[i]),
                out.safe_ids[i],
                self._version.value,
            )
            end = row.finish_check(token, self.max_model_len)
            if end is not None:
                with self._cond:
                    self._finish(row, end[0], end[1])
            else:
                keep.append(i)
                if row.pending_steps >= self.flush_every:
                    row.emit(row.take_chunk(policy_version=self._version.value))
        if keep:
            batch.keep(keep)
        else:
            batch.rows = []
        return out.tokens[keep]
