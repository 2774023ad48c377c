"""The vLLM engine: ``AsyncLLM`` with exact safe-vocabulary (DVP) fields per step.

One ``generate`` call is one rollout: an ``n=1`` request to vLLM with the
rollout's temperature, seed, stop strings / stop token ids / ignore_eos, and the
rule as the request sent it in ``extra_args`` (``_args.rule_tag``). vLLM's own
min_p / top_k / top_p stay off: our logits processor (``_processor.py``) applies
the rule in vLLM's sampler, on the step's float32 logits, masks everything
outside S (so vLLM samples from pi_S: the token is in S by construction) and
sends ``|S|``, ``log Z_S`` and the ids of S per (request, step) to this process
(``_channel.py``). vLLM returns the token with its processed log-prob,
``log pi_S(y)``; the chunk's fields follow (``_steps.py``). Every field is exact at
any temperature and the rule is never capped.

Lifecycle: ``start()`` builds the ``AsyncLLM`` (model load, worker processes;
~20 s on CPU) in a worker thread, so the loop keeps answering ``/health``;
``shutdown()`` stops it (~5 s). If the ``EngineCore`` process dies, ``state``
turns ``'dead'`` and running streams raise :class:`EngineError`; the server's
supervisor (``supervisor.py``) then calls ``shutdown()`` and ``start()`` again:
same settings, and the last loaded weights re-applied (kept as hard links) so
``policy_version`` still names the served weights. vLLM is imported lazily,
only here and in ``_args.py`` / ``_processor.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import shutil
import time
import weakref
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dvp_schemas import EngineCapabilities, FinishReason

from ...model_store import eos_ids, load_tokenizer, model_name
from ..base import EngineError, EngineInfo, EngineParams, PolicyVersion, RolloutChunk
from ..inputs import checked_prompt
from ..scoring import ScoredSequence, ScoreParams
from ._args import (
    VllmSettings,
    engine_args,
    on_cpu,
    require_v1_model_runner,
    rule_tag,
    sampling_params,
    setup_cpu_env,
)
from ._channel import StepChannel, StepTimeout
from ._lora import write_zero_adapter
from ._reload import load_lora, reload_weights, version_salt
from ._score import score_with_vllm
from ._steps import StepBuffer, Steps, chunk_fields, read_sampled
from ._updates import WeightUpdates

__all__ = ["VllmEngine", "VllmSettings"]

logger = logging.getLogger(__name__)

ALL_FIELDS: list[Any] = [
    "token_ids",
    "logprobs",
    "masked_logprobs",
    "safe_logmass",
    "safe_sizes",
    "safe_token_ids",
]
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}


class VllmEngine(WeightUpdates):
    """vLLM's ``AsyncLLM`` behind the :class:`~.base.Engine` protocol.

    Args:
        model_dir: a transformers directory (``model_store.resolve_model``).
        settings: engine knobs (:class:`VllmSettings`).
        model_id: the name reported in ``info``; default the directory name.
    """

    def __init__(
        self, model_dir: Path, settings: VllmSettings | None = None, *, model_id: str | None = None
    ) -> None:
        self.model_dir = Path(model_dir)
        self.settings = settings or VllmSettings()
        if self.settings.max_logprobs < 1:
            raise ValueError(f"max_logprobs must be >= 1, got {self.settings.max_logprobs}")
        self._model_id = model_id or model_name(self.model_dir)
        self._llm: Any = None
        self._state = "starting"
        self._eos_ids: frozenset[int] = frozenset()
        self.info = self._make_info(vocab_size=0, max_model_len=0)
        self._channel: StepChannel | None = None
        self._keys = itertools.count()
        self._version = PolicyVersion()
        self._weights_dir: Path | None = None  # links to the last loaded weights
        # versions at which a recompute update prefilled every in-flight rollout again
        self._recomputes: list[int] = []
        # --enable-lora: the adapter the policy slot serves (a zero one for the base
        # alone, _lora.py), and the zero one
        self._lora_dir: Path | None = None
        self._zero_lora: Path | None = None

    # ----------------------------------------------------------------- protocol

    @property
    def policy_version(self) -> int:
        """Weights version: 0 at start, +1 per :meth:`load_weights`."""
        return self._version.value

    @property
    def state(self) -> str:
        """'starting' | 'running' | 'dead'."""
        if self._state == "running" and self._llm is not None and self._llm.errored:
            return "dead"
        return self._state

    @property
    def active_rollouts(self) -> int:
        """Rollouts vLLM holds (waiting or decoding); 0 when not running."""
        return int(self._llm.get_num_unfinished_requests()) if self._llm is not None else 0

    async def start(self) -> None:
        """Build the ``AsyncLLM`` in a worker thread (~20 s on CPU); again after a death.

        Built outside the loop, the ``AsyncLLM`` starts its output handler and
        binds its asyncio ZMQ sockets lazily, on first use from the serving loop.
        Weights loaded before a restart are loaded again (``policy_version`` kept).

        Raises:
            ValueError: bad settings for this model.
            EngineError: the weights loaded before a restart could not be re-applied.
        """
        if self._llm is not None:
            return
        from vllm.v1.engine.async_llm import AsyncLLM

        self._state = "starting"
        cpu = on_cpu()
        if cpu:
            setup_cpu_env(self.settings)
        require_v1_model_runner()
        args = engine_args(self.model_dir, self.settings, cpu=cpu)
        if self.settings.enable_lora and self._zero_lora is None:
            self._zero_lora = write_zero_adapter(self.model_dir)
            weakref.finalize(self, shutil.rmtree, self._zero_lora, True)
            self._lora_dir = self._zero_lora
        self._channel = StepChannel()  # bound before vLLM's processes connect to it
        await self._channel.start()
        t0 = time.perf_counter()
        build = asyncio.ensure_future(asyncio.to_thread(AsyncLLM.from_engine_args, args))
        try:
            self._llm = await asyncio.shield(build)
            version = self._version.value
            if self._weights_dir is not None:  # a restart: serve the same weights again
                await reload_weights(self._llm, self._weights_dir, version, lora=self._lora_dir)
                logger.info("re-applied the weights of policy_version %d", version)
            elif version and self._lora_dir is not None:  # adapters only: the slot and stamp
                await load_lora(self._llm, self._lora_dir, version)
                logger.info("re-applied the adapter of policy_version %d", version)
        except BaseException:  # failed, or cancelled (server stopping): leave no processes
            if self._llm is None:
                with contextlib.suppress(Exception):
                    self._llm = await build  # a build under way ends first
            await self.shutdown()
            raise
        model_config = self._llm.vllm_config.model_config
        self._eos_ids = frozenset(eos_ids(load_tokenizer(self.model_dir), self.model_dir))
        self.info = self._make_info(
            vocab_size=int(model_config.get_vocab_size()),
            max_model_len=int(model_config.max_model_len),
        )
        # The serving loop does no tensor work: one intra-op thread, so it never
        # waits for a core the worker's OpenMP threads hold.
        torch.set_num_threads(1)
        self._state = "running"
        logger.info(
            "vLLM engine up in %.1f s (%s, %s, safe sets from the sampler)",
            time.perf_counter() - t0,
            "cpu" if cpu else "gpu",
            self.settings.dtype,
        )

    async def shutdown(self) -> None:
        """Stop the engine (its processes); unfinished rollouts end with an error."""
        llm, self._llm = self._llm, None
        self._state = "dead"
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()
        if llm is not None:
            # vLLM stops the EngineCore before it cancels its output handler, which
            # then logs the stopped core as an EngineDeadError with a traceback. With
            # nothing in flight, cancel the handler first; with requests in flight,
            # leave it: it ends their streams with the error.
            handler = getattr(llm, "output_handler", None)
            idle = llm.get_num_unfinished_requests() == 0
            if handler is not None and not handler.done() and idle:
                handler.cancel()
                await asyncio.wait([handler], timeout=5)
            # Synchronous (SIGTERM to EngineCore, waits for it; ~1 s once it died): off
            # the loop. vLLM's own liveness monitor calls it from a thread too.
            await asyncio.to_thread(llm.shutdown)
            # AsyncLLM.__del__ calls shutdown() again, maybe at interpreter exit when
            # vLLM's module globals are None already (a TypeError traceback): no-op it.
            llm.shutdown = lambda timeout=None: None

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: EngineParams
    ) -> AsyncGenerator[RolloutChunk, None]:
        """Decode one rollout; yields chunks, the last with ``finish_reason`` set.

        Raises:
            ValueError: a bad prompt or parameter (the message names it).
            EngineError: the engine is not running, or it died.
        """
        from vllm import TokensPrompt
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError

        llm = self._running()
        channel = self._channel
        assert channel is not None  # set while running
        prompt = self._validate(prompt_token_ids, params)
        key = f"{request_id}#{next(self._keys)}"  # unique: never reused, even on retries
        tag = rule_tag(
            key,
            channel.addr,
            params.rule,
            temperature=params.temperature,
            with_ids=params.return_safe_token_ids,
        )
        sp = sampling_params(params, tag, self.settings.flush_every)
        channel.register(key)
        admitted = self.policy_version
        stream = llm.generate(
            TokensPrompt(prompt_token_ids=prompt, cache_salt=version_salt(admitted)),
            sp,
            request_id=request_id,
            lora_request=self._lora_request(),
        )
        flush, buf, finished, done = self.settings.flush_every, StepBuffer(), False, 0
        try:
            async for out in stream:  # DELTA outputs: only the new steps
                comp = out.outputs[0]
                tokens = np.asarray(comp.token_ids, dtype=np.int64)
                steps = await self._steps(channel, key, done, tokens, comp.logprobs)
                done += len(tokens)
                buf.add(steps)
                chunks = [self._chunk(p, params, admitted) for p in buf.ready(flush, out.finished)]
                if not out.finished:
                    for chunk in chunks:
                        yield chunk
                    continue
                finished = True
                last = chunks.pop() if chunks else self._chunk(steps, params, admitted)
                for chunk in chunks:
                    yield chunk
                last.finish_reason = _FINISH.get(str(comp.finish_reason), "error")
                last.stop_reason = self._stop_reason(comp.stop_reason, params)
                yield last
                return
        except EngineDeadError as exc:
            finished = True  # nothing to abort
            if self._llm is llm:  # not a new engine started meanwhile
                self._state = "dead"
            raise EngineError(f"vLLM engine died (retryable: it is restarted): {exc}") from exc
        except VLLMValidationError as exc:
            raise ValueError(str(exc)) from exc
        finally:
            channel.unregister(key)
            await stream.aclose()  # vLLM aborts the request on GeneratorExit
            if not finished and self._llm is llm:
                await llm.abort(request_id)

    @staticmethod
    async def _steps(
        channel: StepChannel, key: str, start: int, tokens: np.ndarray, flat: Any
    ) -> Steps:
        """The new steps ``[start, start + t)`` of an output, joined with their records.

        Raises:
            EngineError: vLLM's log-probs do not line up with its tokens, or the step
                records did not come.
        """
        t = len(tokens)
        ids, masked = read_sampled(flat, t)
        if not np.array_equal(ids, tokens):
            raise EngineError("vLLM log-probs do not line up with the sampled tokens")
        try:
            records = await channel.take(key, start, start + t)
        except StepTimeout as exc:
            raise EngineError(f"safe sets missing from the vLLM sampler: {exc}") from exc
        return Steps(tokens, masked, records)

    async def abort(self, request_id: str) -> None:
        """Abort a rollout; its stream ends with finish_reason 'abort'."""
        if self._llm is not None:
            await self._llm.abort(request_id)

    async def score(
        self, sequences: Sequence[tuple[list[int], list[int]]], params: ScoreParams
    ) -> list[ScoredSequence]:
        """Teacher-forced scoring: the completion forced through vLLM's sampler (``_score.py``).

        Raises:
            ValueError: a sequence is longer than ``max_model_len - 1`` tokens.
            EngineError: the engine is not running, or vLLM failed the forcing.
        """
        llm = self._running()
        limit = self.info.max_model_len - 1
        for i, (p, c) in enumerate(sequences):
            if len(p) + len(c) > limit:
                raise ValueError(
                    f"sequences.{i}: the vllm engine scores at most {limit} tokens "
                    f"(max_model_len - 1), got {len(p) + len(c)}"
                )
        channel = self._channel
        assert channel is not None  # set while running
        return await score_with_vllm(
            llm,
            channel,
            sequences,
            params,
            policy_version=self.policy_version,
            lora_request=self._lora_request(),
        )

    # ---------------------------------------------------------------- helpers

    def _make_info(self, vocab_size: int, max_model_len: int) -> EngineInfo:
        return EngineInfo(
            name="vllm",
            model_id=self._model_id,
            dtype=self.settings.dtype,
            vocab_size=vocab_size,
            max_model_len=max_model_len,
            capabilities=EngineCapabilities(
                fields=list(ALL_FIELDS),
                exact_at_any_temperature=list(ALL_FIELDS),
                max_top_k=None,  # the rule as sent, uncapped: S comes from the sampler
                score=True,
                # vLLM's "fp8_per_block": e4m3 weights with 128 x 128 block scales
                quantization="fp8-e4m3-block128" if self.settings.quantization else None,
            ),
            eos_token_ids=tuple(sorted(self._eos_ids)),
        )

    def _running(self) -> Any:
        if self._llm is None or self.state != "running":
            raise EngineError(f"vLLM engine is not running (state {self.state!r})")
        return self._llm

    def _validate(self, prompt: list[int], params: EngineParams) -> list[int]:
        return checked_prompt(prompt, params, self.info.vocab_size, self.info.max_model_len)

    def _chunk(self, steps: Steps, params: EngineParams, admitted: int) -> RolloutChunk:
        """t steps of a completion as a chunk (``_steps.chunk_fields``).

        Each token's policy version is the worker's stamp on its step record. Its KV
        version is the version the rollout was admitted under (its ``cache_salt``: the
        oldest its prompt's blocks can be from), or the latest recompute update at or
        before the token's version that came after admission (every block computed
        again then).

        Raises:
            EngineError: a step's fields are inconsistent (never expected).
        """
        try:
            fields = chunk_fields(steps, params.return_safe_token_ids)
        except ValueError as exc:
            raise EngineError(f"vLLM step fields: {exc}") from exc
        pv = fields["policy_versions"]
        kv = np.full(len(pv), admitted, dtype=np.int64)
        for r in self._recomputes:
            if r > admitted:
                kv[pv >= r] = r
        first = int(pv[0]) if len(pv) else self.policy_version
        return RolloutChunk(**fields, kv_versions=kv, policy_version=first)

    def _stop_reason(self, reason: Any, params: EngineParams) -> str | int | None:
        """vLLM's stop reason, with end-of-sequence reported as None (as the torch engine).

        vLLM adds the generation config's extra eos ids to ``stop_token_ids`` and
        then reports them as the stop reason.
        """
        if isinstance(reason, int) and reason in self._eos_ids:
            return reason if reason in params.stop_token_ids else None
        return reason if isinstance(reason, (str, int)) else None
