"""The rollout service: request in, columnar rollouts out (the routes stay thin).

:meth:`RolloutService.create_rollouts` does, in order:

1. check the request against the served model: model id (404 ``model``), ``n``
   and ``len(prompts) * n`` (422 ``n``), ``sampling.max_tokens`` against the cap;
2. turn every prompt into token ids: text is tokenized, chat messages go through
   the model's chat template (``add_generation_prompt=True``), token ids are
   checked against the vocabulary (422 ``prompts.i.j``); prompts too long for
   the context get a 422 naming ``prompts.i``;
   a request whose response is over ``--max-response-bytes`` without its safe
   sets gets a 422 naming ``sampling.max_tokens``; its sets are counted as they
   are produced (a 422 naming ``return_safe_token_ids`` once they pass what the
   limit leaves, ``response_size.py``);
3. build each sample's :class:`EngineParams` (``params.py``) and fan the
   ``prompts x n`` rollouts out as concurrent ``engine.generate`` calls; if one
   fails, or the HTTP client goes away, all of them are cancelled and aborted;
4. join each rollout's chunks into a :class:`Rollout` (``assembly.py``: NaN ->
   null for ``logprobs`` / ``safe_logmass``, CSR safe ids, decoded text with the
   stop string removed), ordered by ``(prompt_index, sample_index)``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from dvp_schemas import (
    ChatMessage,
    Prompt,
    Rollout,
    RolloutRequest,
    RolloutResponse,
    Usage,
)

from ..config import ServerConfig
from ..engines.base import Engine, EngineError, EngineParams, RolloutChunk
from ..errors import ServiceError, validation_error
from .assembly import assemble_rollout
from .params import draw_request_seed, effective_rule, request_seed_of, to_engine_params
from .prompts import INLINE_CHARS, check_text_bound, prompt_chars, text_bound
from .response_size import SetBudget, check_response_size, token_bytes

__all__ = ["PreparedRequest", "RolloutService", "rollout_id"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Job:
    """One rollout to decode: sample ``sample_index`` of prompt ``prompt_index``."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    params: EngineParams


@dataclass(frozen=True)
class PreparedRequest:
    """A checked rollout request, ready to fan out (:meth:`RolloutService.prepare`).

    Attributes:
        request: the request with the effective rule.
        request_id: the HTTP request id (echoed in the response).
        key: unique prefix of the engine ids of its rollouts.
        seed: the request seed (drawn when the request has none).
        prompts: every prompt's token ids.
        jobs: one per (prompt, sample), ordered by prompt, then sample.
        sets: the bytes its safe sets may take, counted as they are produced
            (``response_size.py``); None: it asks for none.
    """

    request: RolloutRequest
    request_id: str
    key: str
    seed: int
    prompts: list[list[int]]
    jobs: list[_Job]
    sets: SetBudget | None = None


_REQUEST_SEQ = itertools.count()  # makes engine ids unique when clients reuse X-Request-Id


def rollout_id(request_key: str, job: _Job) -> str:
    """The engine request id of one rollout: ``<request key>-<prompt>-<sample>``."""
    return f"{request_key}-{job.prompt_index}-{job.sample_index}"


class RolloutService:
    """Serves ``POST /v1/rollouts`` over one engine.

    Args:
        engine: a started :class:`~dvp_server.engines.base.Engine`.
        tokenizer: the model's transformers tokenizer (text prompts, chat template,
            decoding).
        config: limits and defaults.
    """

    def __init__(self, engine: Engine, tokenizer: Any, config: ServerConfig) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self._text_bound: int | None = None  # prompts.text_bound, on first use

    @property
    def model_id(self) -> str:
        """The id clients name in ``model`` (``--served-model-name`` or the engine's)."""
        return self.config.served_model_name or self.engine.info.model_id

    @property
    def max_prompt_tokens(self) -> int:
        """Longest prompt served: leaves room for at least one new token."""
        room = self.engine.info.max_model_len - 1
        cap = self.config.max_prompt_tokens
        return min(room, cap) if cap is not None else room

    async def create_rollouts(self, request: RolloutRequest, request_id: str) -> RolloutResponse:
        """Sample ``request.n`` rollouts of every prompt (see the module docstring).

        Raises:
            ServiceError: the request does not fit the model or the server limits.
            EngineError: the engine failed a rollout (all others were aborted).
        """
        prepared = await self.prepare(request, request_id)
        results = await self._run_all(prepared.jobs, prepared.key, prepared.sets)
        rollouts = [
            self.assemble(prepared, job, chunks)
            for job, chunks in zip(prepared.jobs, results, strict=True)
        ]
        return self.response(prepared, rollouts)

    async def prepare(self, request: RolloutRequest, request_id: str) -> PreparedRequest:
        """Steps 1-3 of the module docstring up to the fan-out: checks, prompt ids, jobs.

        Raises:
            ServiceError: the request does not fit the model or the server limits.
            EngineError: the engine is not running.
        """
        if self.engine.state != "running":
            raise EngineError(f"the {self.engine.info.name} engine is {self.engine.state}")
        self._check_request(request)
        request = self._with_effective_rule(request)
        prompts = await self.prompt_ids(request.prompts)
        seed = request_seed_of(request, draw_request_seed())
        max_len = self.engine.info.max_model_len
        jobs = [
            _Job(i, j, ids, self._params(request, j, seed, max_len - len(ids)))
            for i, ids in enumerate(prompts)
            for j in range(request.n)
        ]
        sets = check_response_size(
            request,
            [(len(job.prompt_ids), job.params.max_tokens) for job in jobs],
            vocab_size=self.engine.info.vocab_size,
            token_bytes=token_bytes(self.tokenizer),
            limit=self.config.max_response_bytes,
        )
        key = f"{request_id}.{next(_REQUEST_SEQ)}"
        return PreparedRequest(request, request_id, key, seed, prompts, jobs, sets)

    def assemble(self, prepared: PreparedRequest, job: _Job, chunks: list[RolloutChunk]) -> Rollout:
        """Step 4: join one rollout's chunks (``assembly.assemble_rollout``)."""
        fields = set(self.engine.info.capabilities.fields)
        return assemble_rollout(
            rollout_id(prepared.key, job),
            chunks,
            prompt_index=job.prompt_index,
            sample_index=job.sample_index,
            prompt_ids=job.prompt_ids,
            seed=prepared.seed,
            tokenizer=self.tokenizer if prepared.request.return_text else None,
            with_logprobs="logprobs" in fields,
            with_logmass="safe_logmass" in fields,
            with_safe_ids=job.params.return_safe_token_ids,
            vocab_size=self.engine.info.vocab_size,
            safe_format=prepared.request.safe_token_ids_format,
        )

    def response(self, prepared: PreparedRequest, rollouts: list[Rollout]) -> RolloutResponse:
        """The response around assembled rollouts (ordered by prompt, then sample)."""
        completion = sum(r.num_tokens for r in rollouts)
        prompt_tokens = sum(len(ids) for ids in prepared.prompts)  # each prompt once, whatever n
        return RolloutResponse(
            id=prepared.request_id,
            model=self.model_id,
            engine=self.engine.info.name,
            temperature=prepared.request.sampling.temperature,
            pruning=prepared.request.pruning,
            policy_version=max(
                (r.version_spans[-1][1] if r.version_spans else r.policy_version) for r in rollouts
            ),
            rollouts=rollouts,
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion,
                total_tokens=prompt_tokens + completion,
            ),
        )

    # --- validation -------------------------------------------------------------------

    def _check_request(self, request: RolloutRequest) -> None:
        """Model id and server limits; 404 / 422 naming the field."""
        cfg = self.config
        if request.model is not None and request.model not in (self.model_id, cfg.model):
            raise ServiceError(
                404,
                "not_found_error",
                f"model: {request.model!r} is not served here; this server serves "
                f"{self.model_id!r}",
                "model",
            )
        if request.n > cfg.max_n:
            raise validation_error("n", f"n={request.n} is over the server limit {cfg.max_n}")
        total = len(request.prompts) * request.n
        if total > cfg.max_rollouts_per_request:
            param = "prompts" if len(request.prompts) > cfg.max_rollouts_per_request else "n"
            raise validation_error(
                param,
                f"{len(request.prompts)} prompts x n={request.n} = {total} rollouts is over "
                f"the server limit of {cfg.max_rollouts_per_request} per request",
            )
        sampling = request.sampling
        if "max_tokens" in sampling.model_fields_set and sampling.max_tokens > cfg.max_tokens_cap:
            raise validation_error(
                "sampling.max_tokens",
                f"max_tokens={sampling.max_tokens} is over the server cap {cfg.max_tokens_cap}",
            )
        vocab = self.engine.info.vocab_size
        for k, tok in enumerate(sampling.stop_token_ids or ()):
            if not 0 <= tok < vocab:
                raise validation_error(
                    f"sampling.stop_token_ids.{k}",
                    f"token id {tok} is outside the vocabulary [0, {vocab})",
                )

    def _with_effective_rule(self, request: RolloutRequest) -> RolloutRequest:
        """The request with the rule the engine serves (``params.effective_rule``)."""
        try:
            rule = effective_rule(request.pruning, self.engine.info.capabilities.max_top_k)
        except ValueError as exc:
            raise validation_error("pruning.top_k", str(exc)) from exc
        if rule == request.pruning:
            return request
        return request.model_copy(update={"pruning": rule})

    async def prompt_ids(self, prompts: list[Prompt]) -> list[list[int]]:
        """Step 2 for every prompt, without stalling the event loop (``prompts.py``): a
        text over the cheap bound is refused untokenized; long texts are tokenized (and
        chat-templated) in a worker thread.

        Raises:
            ServiceError: 422 naming the first prompt that does not fit.
        """
        if self._text_bound is None:
            self._text_bound = text_bound(self.tokenizer, self.max_prompt_tokens)
        check_text_bound(prompts, self._text_bound, self.max_prompt_tokens)

        def encode() -> list[list[int]]:
            return [self._prompt_ids(i, p) for i, p in enumerate(prompts)]

        if prompt_chars(prompts) <= INLINE_CHARS:
            return encode()
        return await asyncio.to_thread(encode)

    def _prompt_ids(self, index: int, prompt: Prompt) -> list[int]:
        """Token ids of prompt ``index``, checked against the vocabulary and context."""
        param = f"prompts.{index}"
        if isinstance(prompt, str):
            ids = list(self.tokenizer.encode(prompt, add_special_tokens=True))
        elif prompt and isinstance(prompt[0], ChatMessage):
            ids = self._chat_ids(param, [m for m in prompt if isinstance(m, ChatMessage)])
        else:
            ids = [t for t in prompt if isinstance(t, int)]
            self.check_vocab(param, ids)
        if not ids:
            raise validation_error(param, "the prompt tokenizes to no tokens")
        if len(ids) > (limit := self.max_prompt_tokens):
            max_len = self.engine.info.max_model_len
            why = f"a context of {max_len} tokens leaves room for {max_len - 1}"
            if self.config.max_prompt_tokens is not None:
                why += f"; the server allows {self.config.max_prompt_tokens}"
            raise validation_error(
                param, f"prompt has {len(ids)} tokens, over the limit of {limit} ({why})"
            )
        return ids

    def _chat_ids(self, param: str, messages: list[ChatMessage]) -> list[int]:
        """Apply the chat template (with the assistant turn opened), then tokenize."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise validation_error(param, "this model has no chat template; send text or ids")
        text = self.tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], add_generation_prompt=True, tokenize=False
        )
        # The template already holds the special tokens (e.g. <|im_start|>).
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def check_vocab(self, param: str, ids: list[int]) -> None:
        """422 naming ``<param>.<j>`` for the first id outside the vocabulary."""
        vocab = self.engine.info.vocab_size
        if ids and (min(ids) < 0 or max(ids) >= vocab):
            j, tok = next((j, t) for j, t in enumerate(ids) if not 0 <= t < vocab)
            raise validation_error(
                f"{param}.{j}", f"token id {tok} is outside the vocabulary [0, {vocab})"
            )

    def _params(self, request: RolloutRequest, j: int, seed: int, room: int) -> EngineParams:
        return to_engine_params(request, j, self.config, fallback_seed=seed, context_room=room)

    # --- fan-out ----------------------------------------------------------------------

    async def _run_all(
        self, jobs: list[_Job], key: str, sets: SetBudget | None
    ) -> list[list[RolloutChunk]]:
        """Decode all jobs concurrently; on any failure or cancellation, cancel them all."""
        tasks = [
            asyncio.ensure_future(self.collect(rollout_id(key, job), job, sets=sets))
            for job in jobs
        ]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException as exc:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            reason = "cancelled" if isinstance(exc, asyncio.CancelledError) else repr(exc)
            logger.info("request %s: %d rollouts aborted (%s)", key, len(tasks), reason)
            raise

    async def collect(
        self,
        rollout_id: str,
        job: _Job,
        on_chunk: Callable[[RolloutChunk], None] | None = None,
        stream: AsyncIterator[RolloutChunk] | None = None,
        sets: SetBudget | None = None,
    ) -> list[RolloutChunk]:
        """All chunks of one rollout; aborts it in the engine unless it finished.

        Args:
            rollout_id: the engine request id (:func:`rollout_id`).
            job: the rollout.
            on_chunk: called with every chunk as it arrives (streaming).
            stream: the rollout's ``engine.generate`` stream, when the caller opened it
                already (to take its admission slot early); None: opened here.
            sets: the request's safe-set budget, charged with every chunk.

        Raises:
            ServiceError: 422, the request's safe sets passed their budget.
            EngineError: the engine failed or aborted the rollout.
        """
        chunks: list[RolloutChunk] = []
        if stream is None:
            stream = self.engine.generate(rollout_id, job.prompt_ids, job.params)
        finished = False
        try:
            async for chunk in stream:
                if chunk.error is not None or chunk.finish_reason in ("error", "abort"):
                    raise EngineError(
                        f"rollout {rollout_id} ended with {chunk.finish_reason!r}: "
                        f"{chunk.error or 'aborted by the engine'}"
                    )
                if sets is not None:
                    sets.add(chunk)
                chunks.append(chunk)
                if on_chunk is not None:
                    on_chunk(chunk)
                if chunk.finish_reason is not None:
                    finished = True
                    break
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
            if not finished:
                await self.engine.abort(rollout_id)
        if not finished:
            raise EngineError(f"rollout {rollout_id}: the engine stream ended without a finish")
        return chunks
