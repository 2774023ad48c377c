"""The torch reference engine: transformers on CPU, the rule on the full vocabulary.

Every step of every rollout goes through the shared rule
(:func:`dvp_client.train.rule.safe_vocab`) on the full vocabulary, so every field
(log p, log pi_S, log Z_S, |S|, the ids of S) is exact at any temperature; this
engine is the numeric oracle the vLLM engine is tested against.

Threading: one scheduler thread owns the model and does all torch work, so the
asyncio loop never blocks. ``generate`` submits a :class:`~._rows.Row` and awaits
chunks on a per-rollout ``asyncio.Queue`` that the thread fills through
``loop.call_soon_threadsafe``. The scheduler takes up to ``max_batch`` pending
rollouts, prefills them left-padded, decodes them in lock-step with the KV
cache, and drops each row as it finishes; rollouts that arrive meanwhile join
the running batch at the next step (continuous batching), within ``max_batch``
rows and the KV cache budget (``_scheduler.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dvp_schemas import EngineCapabilities

from ...model_store import eos_ids, load_tokenizer, model_name
from ..base import EngineError, EngineInfo, EngineParams, PolicyVersion, RolloutChunk
from ..inputs import checked_prompt
from ..lora import LoraWeights, merged_weights
from ..scoring import ScoredSequence, ScoreParams, score_sequences
from . import _fp8
from ._batch import DecodeBatch, SlackLayer
from ._kernels import forget_packed
from ._kernels import install as install_kernels
from ._prefix import PrefixCache
from ._rows import Row, StopStringMatcher
from ._scheduler import EngineStats, KvBudget, KvBudgetError, SchedulerMixin, StepHook
from ._weights import WeightsInput, copy_weights, read_named_tensors, read_weights

__all__ = ["DTYPES", "EngineStats", "TorchEngine", "default_threads"]

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_ALL_FIELDS: list[Any] = [
    "token_ids",
    "logprobs",
    "masked_logprobs",
    "safe_logmass",
    "safe_sizes",
    "safe_token_ids",
]


def default_threads() -> int:
    """Intra-op threads when none are given: every core this process may use, but one.

    The scheduler thread's OpenMP team then leaves a core to the event loop (HTTP,
    JSON, tokenizing) and to a client on the same machine. A team spread over every
    core shares one with them, and each parallel region (hundreds per decode step)
    waits at its barrier for the member that was descheduled (BENCHMARKS.md, "Torch
    engine through HTTP").
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


class TorchEngine(SchedulerMixin):
    """Batched decoding with a KV cache and the safe-vocabulary rule at every step.

    Args:
        model_dir: a transformers directory (see ``model_store.resolve_model``).
        dtype: "float32" | "bfloat16" | "float16" for the weights; the rule
            always runs in float32.
        max_batch: most rollouts decoded together.
        max_model_len: cap on prompt + completion tokens; default and upper bound
            the config's ``max_position_embeddings``.
        threads: intra-op threads of the scheduler thread; default
            :func:`default_threads` (every usable core but one).
        model_id: the name reported in ``info``; default the model's own name.
        flush_every: steps between chunks of a running rollout (and at finish).
        continuous_batching: admit pending rollouts into a running batch (True),
            or only start a batch when none runs (False: the baseline).
        kv_cache_bytes: most bytes of KV cache the running batch may hold
            (``kv.bytes_per_token`` per position, padding included); None: no bound
            beyond ``max_batch * max_model_len`` positions. A rollout that cannot
            fit alone is refused (ValueError); others wait for room.
        kv_slack: spare positions of each KV buffer, so that a decode step writes
            in place instead of copying the cache (``_batch.SlackLayer``); 0: plain
            transformers ``DynamicLayer`` (concatenates every step).
        quantize: None, or ``"fp8"`` / ``"fp8-channel"``: the linears' weights rounded
            to e4m3 with 128 x 128 block (or per-row) scales and computed in ``dtype``
            (``_fp8.py``); rounded from float32 at load and from the sent tensors at
            every weight update.

    Raises:
        ValueError: an unknown dtype or quantize mode, or a non-positive size.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        dtype: str = "float32",
        max_batch: int = 16,
        max_model_len: int | None = None,
        threads: int | None = None,
        model_id: str | None = None,
        flush_every: int = 16,
        continuous_batching: bool = True,
        kv_cache_bytes: int | None = None,
        kv_slack: int = SlackLayer.SLACK,
        fast_kernels: bool = True,
        share_prefixes: bool = True,
        quantize: str | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        for name, value in (("max_batch", max_batch), ("flush_every", flush_every)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if kv_slack < 0:
            raise ValueError(f"kv_slack must be >= 0, got {kv_slack}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads or default_threads()
        torch.set_num_threads(self.threads)
        self.model_dir = Path(model_dir)
        self.max_batch = max_batch
        self.flush_every = flush_every
        if quantize is not None and quantize not in _fp8.MODES:
            raise ValueError(f"quantize must be one of {sorted(_fp8.MODES)}, got {quantize!r}")
        self.quantize = quantize
        self._fp8_linears: dict[str, torch.nn.Linear] = {}
        self.model: Any = self._load_model(AutoModelForCausalLM, model_dir, DTYPES[dtype])
        self.model.eval()
        self.kernels = install_kernels(self.model) if fast_kernels else {}
        logger.info("torch engine kernels: %s", self.kernels or "stock")
        self.tokenizer = load_tokenizer(model_dir)  # used by the scheduler thread only
        config = self.model.config
        limit = int(getattr(config, "max_position_embeddings", 0) or 0) or (max_model_len or 2048)
        if max_model_len is not None and max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        self.max_model_len = min(limit, max_model_len) if max_model_len else limit
        self.eos_ids = frozenset(eos_ids(self.tokenizer, self.model_dir))
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids, default=0))
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.continuous_batching = continuous_batching
        self.kv = KvBudget(config, self.model.dtype, kv_cache_bytes, kv_slack)
        #: Shared prompt prefixes' keys / values (``_prefix.py``); None: no sharing.
        self.prefixes: PrefixCache | None = PrefixCache() if share_prefixes else None
        self.info = EngineInfo(
            name="torch",
            model_id=model_id or model_name(self.model_dir),
            dtype=dtype,
            vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
            capabilities=EngineCapabilities(
                fields=list(_ALL_FIELDS),
                exact_at_any_temperature=list(_ALL_FIELDS),
                max_top_k=None,
                score=True,
                quantization=_fp8.REPORTED.get(quantize or ""),
            ),
            eos_token_ids=tuple(sorted(self.eos_ids)),
        )
        #: Test seam: called in the scheduler thread before each forward with the
        #: batch's request ids; an exception it raises fails that batch only.
        self.step_hook: StepHook | None = None
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._pending: deque[Row] = deque()
        self._rows: dict[str, Row] = {}  # every submitted, unfinished row
        self._aborts: set[Row] = set()  # rows (not ids: an id may be reused)
        self._batch: DecodeBatch | None = None
        self._last_tokens = np.zeros(0, dtype=np.int64)  # (B,) fed to the next decode
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._prefilled_last = False  # the last turn prefilled: the next one decodes
        self._state = "starting"
        self._version = PolicyVersion()
        self._model_lock = threading.Lock()  # held by every step and by a weight swap
        #: The base weights of the parameters an adapter changed (float32, read from the
        #: base checkpoint): every adapter merges into these, a checkpoint puts them back.
        self._lora_base: dict[str, torch.Tensor] = {}
        #: Called in the scheduler thread after each step with the batch size (metrics).
        self.on_step: Callable[[int], None] | None = None

    # ----------------------------------------------------------------- protocol

    @property
    def policy_version(self) -> int:
        """Weights version: 0 at start, +1 per :meth:`load_weights`."""
        return self._version.value

    @property
    def queued_rollouts(self) -> int:
        """Rollouts submitted and waiting for a batch (the engine's queue depth)."""
        return len(self._pending)

    async def load_weights(
        self, weights: WeightsInput, version: int | None = None, recompute: bool = False
    ) -> int:
        """Copy new weights into the model between two steps; returns the new version.

        A rollout decoding meanwhile continues with the new weights; each of its
        tokens records the version that sampled it and the version of the keys /
        values it read (the rollout's last prefill). With ``recompute`` every running
        rollout's context is prefilled again right after the swap, so every later
        token reads only new keys / values. (``drain`` / ``abort`` updates come with
        no rollout running: ``admission.py``.)

        Args:
            weights: safetensors files, or a name -> tensor mapping (a subset is fine).
            version: the ``policy_version`` to serve them as (a fleet's number); None:
                the current one plus one.
            recompute: prefill the running rollouts' contexts again (above).

        Raises:
            ValueError: an unknown name, a wrong shape or dtype (nothing changed).
        """
        tensors = await asyncio.to_thread(read_weights, weights)
        return await asyncio.to_thread(self._swap_weights, tensors, version, recompute)

    async def load_adapter(
        self,
        lora: LoraWeights | None,
        scale: float,
        base: Sequence[Path],
        version: int | None = None,
        recompute: bool = False,
    ) -> int:
        """Serve base + a LoRA adapter (merged exactly), or the base again (``lora`` None).

        Each adapted weight becomes ``W + scale * B @ A`` (``engines/lora.py``) with
        ``W`` the base tensor, read once from ``base`` and kept aside: switching
        adapters never accumulates, and weights no longer adapted get their base back.
        The swap is :meth:`load_weights`' (every copy refreshed; in-flight rollouts).

        Args:
            lora: parameter name -> (A ``(r, in)``, B ``(out, r)``); None: no adapter.
            scale: the adapter's ``lora_alpha / r``.
            base: the served base checkpoint's safetensors files.
            version, recompute: as in :meth:`load_weights`.

        Raises:
            ValueError: a name or shape the model does not have (nothing changed).
        """
        tensors = await asyncio.to_thread(self._adapter_tensors, lora or {}, scale, base)
        return await asyncio.to_thread(self._swap_weights, tensors, version, recompute, True)

    def _adapter_tensors(
        self, lora: LoraWeights, scale: float, base: Sequence[Path]
    ) -> dict[str, torch.Tensor]:
        """The tensors to copy: merged weights, and the base of those no longer adapted."""
        need = [n for n in lora if n not in self._lora_base]
        fresh = read_named_tensors(base, need) if need else {}
        bases = {**self._lora_base, **fresh}
        out = {n: t for n, t in bases.items() if n not in lora}  # back to their base
        out.update(merged_weights(bases, lora, scale))
        self._lora_base = bases
        return out

    def _load_model(self, auto_cls: Any, model_dir: str | os.PathLike[str], dtype: Any) -> Any:
        """The model in ``dtype``; with ``quantize``, its linears rounded from float32."""
        if self.quantize is None:
            return auto_cls.from_pretrained(str(model_dir), dtype=dtype)
        model = auto_cls.from_pretrained(str(model_dir), dtype=torch.float32)
        self._fp8_linears = _fp8.round_model(model, dtype, _fp8.MODES[self.quantize])
        logger.info("torch engine: %d linears rounded to %s", len(self._fp8_linears), self.quantize)
        return model

    def _swap_weights(
        self,
        tensors: dict[str, torch.Tensor],
        version: int | None,
        recompute: bool = False,
        adapter: bool = False,
    ) -> int:
        """Copy ``tensors`` in and refresh every derived copy; ``adapter``: they are an
        adapter's merge (else a checkpoint: any weight an adapter changed that it leaves
        out gets its base back, and no base is kept any longer)."""
        if not adapter and self._lora_base:
            tensors = {**{n: t for n, t in self._lora_base.items() if n not in tensors}, **tensors}
        with self._model_lock, torch.inference_mode():
            copy_weights(self.model, tensors)
            if not adapter:
                self._lora_base = {}
            if self.quantize is not None:  # round again from the sent precision
                _fp8.requantize(self._fp8_linears, tensors, _fp8.MODES[self.quantize])
            forget_packed(self.model)
            if self.prefixes is not None:
                self.prefixes.clear()  # keys / values of the old weights
            new = self._version.advance(version)
            if recompute:
                self._recompute()
            return new

    async def score(
        self, sequences: Sequence[tuple[list[int], list[int]]], params: ScoreParams
    ) -> list[ScoredSequence]:
        """Teacher-forced scoring (``POST /v1/score``) under the model lock, between steps.

        The serving layer has checked ids and lengths. Every field is exact.

        Raises:
            EngineError: the engine is not running.
        """
        if self.state != "running":
            raise EngineError(f"torch engine is not running (state {self.state!r})")
        return await asyncio.to_thread(self._score_locked, sequences, params)

    def _score_locked(
        self, sequences: Sequence[tuple[list[int], list[int]]], params: ScoreParams
    ) -> list[ScoredSequence]:
        with self._model_lock, torch.inference_mode():  # no step, no weight swap meanwhile
            version = self.policy_version
            return score_sequences(
                self.model, sequences, params, pad_id=self.pad_id, policy_version=version
            )

    @property
    def active_rollouts(self) -> int:
        """Rollouts submitted and not yet finished (queued or decoding); /health reports it."""
        return len(self._rows)

    @property
    def state(self) -> str:
        """'starting' | 'running' | 'dead'."""
        if self._state == "running" and not (self._thread and self._thread.is_alive()):
            return "dead"
        return self._state

    async def start(self) -> None:
        """Start the scheduler thread; idempotent, and a new one after a death or shutdown.

        A dead thread has failed its rows already (``_run``); the model, weights
        and ``policy_version`` carry over to the new thread.
        """
        if self._thread is not None and self._thread.is_alive():
            return
        with self._cond:
            self._stopping = False
            self._batch = None
            self._last_tokens = np.zeros(0, dtype=np.int64)
        self._thread = threading.Thread(target=self._run, name="dvp-torch-engine", daemon=True)
        self._state = "running"
        self._thread.start()

    async def shutdown(self) -> None:
        """Stop the scheduler; unfinished rollouts end with finish_reason 'abort'."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._state = "dead"

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: EngineParams
    ) -> AsyncGenerator[RolloutChunk, None]:
        """Decode one rollout; yields chunks, the last with ``finish_reason`` set.

        Raises:
            ValueError: a bad prompt or parameter (the message names it), or a
                request id already in use.
            EngineError: the engine is not running, or the rollout's batch failed.
        """
        prompt = self._validate(request_id, prompt_token_ids, params)
        loop = asyncio.get_running_loop()
        row = Row(
            request_id=request_id,
            prompt=prompt,
            params=params,
            loop=loop,
            queue=asyncio.Queue(),
            eos_ids=self.eos_ids,
            stop_matcher=StopStringMatcher(self.tokenizer, params.stop) if params.stop else None,
        )
        with self._cond:
            if self.state != "running" or self._stopping:
                raise EngineError(f"torch engine is not running (state {self.state!r})")
            if request_id in self._rows:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._rows[request_id] = row
            self._pending.append(row)
            self._cond.notify_all()
        finished = False
        try:
            while True:
                chunk = await row.queue.get()
                if chunk.finish_reason == "error":
                    finished = True
                    raise EngineError(f"rollout {request_id!r} failed: {chunk.error}")
                finished = chunk.finish_reason is not None
                yield chunk
                if finished:
                    return
        finally:
            if not finished:  # closed early: the client went away
                self._request_abort(request_id)

    async def abort(self, request_id: str) -> None:
        """Abort a rollout; it ends with a chunk whose finish_reason is 'abort'."""
        self._request_abort(request_id)

    # ------------------------------------------------------------ submission

    def _validate(self, request_id: str, prompt: list[int], params: EngineParams) -> list[int]:
        ids = checked_prompt(prompt, params, self.vocab_size, self.max_model_len)
        need = min(len(ids) + params.max_tokens, self.max_model_len)
        if not self.kv.fits(1, need):
            raise KvBudgetError(
                f"prompt + max_tokens = {need} tokens need "
                f"{(need + self.kv.slack) * self.kv.bytes_per_token} bytes of KV cache "
                f"({self.kv.bytes_per_token} per token, {self.kv.slack} spare), more than the "
                f"engine's kv_cache_bytes budget {self.kv.budget_bytes}: lower max_tokens"
            )
        return ids

    def _request_abort(self, request_id: str) -> None:
        with self._cond:
            row = self._rows.get(request_id)
            if row is None:
                return
            if row in self._pending:  # not started: end it here
                self._pending.remove(row)
                self._finish(row, "abort", None)
            else:
                self._aborts.add(row)
                self._cond.notify_all()
