"""OpenAI-compatible completions and chat completions over the rollout service.

One sampling path: an OpenAI request becomes a :class:`dvp_schemas.RolloutRequest`
(:func:`completion_to_rollouts`, :func:`chat_to_rollouts`: pure functions),
:meth:`RolloutService.create_rollouts` samples it exactly as ``/v1/rollouts``
would, and the rollouts are dressed as OpenAI choices, each with its DVP
extension (``dvp``). Field mapping, OpenAI -> rollout request:

=========================  ==============================================
OpenAI                     rollout request
=========================  ==============================================
prompt / messages          prompts (one prompt per text / id list; chat:
                           the server applies the chat template)
n                          n (choice index = prompt index * n + sample)
max_tokens                 sampling.max_tokens (chat:
(max_completion_tokens)    max_completion_tokens wins); unset: server default
temperature                sampling.temperature (unset: 1)
seed, stop                 sampling.seed, sampling.stop
top_p                      pruning.top_p
min_p, top_k (extra body)  pruning.min_p, pruning.top_k
return_safe_token_ids      return_safe_token_ids
stop_token_ids, ignore_eos sampling.stop_token_ids, sampling.ignore_eos
=========================  ==============================================

Log-probs: ``token_logprobs`` / ``logprob`` are the sampled tokens' full
log-probs from sampling (the rollout's ``logprobs``; null where the engine
cannot give them exactly). The top-k alternatives (``logprobs: k`` /
``top_logprobs: k``, k > 0) come from the engine's teacher-forced
recomputation of the sampled sequence (``Scorer.score``, one extra forward
per choice; the torch engine reproduces the sampling-time values within
~1e-5). Token strings are ``tokenizer.decode([id])``; ``bytes`` are the
token's own bytes (byte-level BPE), so a character split across tokens
joins correctly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import pydantic
from dvp_schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionRequest,
    CompletionResponse,
    DvpChoice,
    DvpInfo,
    Rollout,
    RolloutRequest,
    RolloutResponse,
)
from dvp_schemas.openai import (
    AssistantMessage,
    ChatChoice,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    TokenLogprob,
    TopLogprob,
)

from ..engines.scoring import ScoreParams
from ..errors import ServiceError, describe_validation_errors
from .serving import RolloutService

__all__ = ["OpenAIService", "TokenStrings", "chat_to_rollouts", "completion_to_rollouts"]


def _sampling(
    req: CompletionRequest | ChatCompletionRequest, max_tokens: int | None
) -> dict[str, Any]:
    sampling: dict[str, Any] = {"ignore_eos": req.ignore_eos}
    optional = {
        "temperature": req.temperature,
        "max_tokens": max_tokens,
        "seed": req.seed,
        "stop": req.stop,
        "stop_token_ids": req.stop_token_ids,
    }
    sampling.update({k: v for k, v in optional.items() if v is not None})
    return sampling


def _rollout_request(body: dict[str, Any]) -> RolloutRequest:
    """Validate the mapped body; a field that does not fit is a 422 naming it."""
    try:
        return RolloutRequest.model_validate(body)
    except pydantic.ValidationError as exc:
        param, message = describe_validation_errors(exc.errors())
        raise ServiceError(422, "invalid_request_error", message, param) from exc


def completion_to_rollouts(req: CompletionRequest) -> RolloutRequest:
    """The rollout request of an OpenAI completions request (module docstring table)."""
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    return _rollout_request(
        {
            "prompts": prompts,
            "n": req.n,
            "sampling": _sampling(req, req.max_tokens),
            "pruning": req.rule,
            "return_safe_token_ids": req.return_safe_token_ids,
            "model": req.model,
        }
    )


def chat_to_rollouts(req: ChatCompletionRequest) -> RolloutRequest:
    """The rollout request of an OpenAI chat request: one chat prompt ('developer' -> system)."""
    messages = [
        ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text)
        for m in req.messages
    ]
    max_tokens = req.max_completion_tokens or req.max_tokens
    return _rollout_request(
        {
            "prompts": [messages],
            "n": req.n,
            "sampling": _sampling(req, max_tokens),
            "pruning": req.rule,
            "return_safe_token_ids": req.return_safe_token_ids,
            "model": req.model,
        }
    )


def _renamer(prompt_field: str, sent: Mapping[str, str] | None = None) -> Callable[[str], str]:
    """Rollout-request param -> OpenAI param: ``sampling.X`` / ``pruning.X`` -> ``X``
    (or the name the client sent it under, ``sent[X]``); ``prompts.<i>[.<j>]`` ->
    ``prompt_field`` (``{i}`` filled in) ``[.<j>]``."""
    aliases = dict(sent or {})

    def rename(param: str) -> str:
        head, _, rest = param.partition(".")
        if head in ("sampling", "pruning") and rest:
            return aliases.get(rest, rest)
        if head == "prompts":
            index, _, tail = rest.partition(".")
            base = prompt_field.format(i=index)
            return f"{base}.{tail}" if tail and base != "messages" else base
        return param

    return rename


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: character -> byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenStrings:
    """Token id -> OpenAI token string and bytes (cached per id)."""

    _BYTE_OF = _bytes_to_unicode()

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        """``(decode([id]), the token's bytes)``."""
        hit = self._cache.get(token_id)
        if hit is None:
            text = str(self.tokenizer.decode([token_id], skip_special_tokens=False))
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and piece and all(c in self._BYTE_OF for c in piece):
                raw = [self._BYTE_OF[c] for c in piece]  # byte-level BPE: exact bytes
            else:
                raw = list(text.encode("utf-8"))
            hit = self._cache[token_id] = (text, raw)
        return hit


def _dvp_choice(r: Rollout) -> DvpChoice:
    return DvpChoice(
        prompt_token_ids=r.prompt_token_ids,
        token_ids=r.token_ids,
        logprobs=r.logprobs,
        masked_logprobs=r.masked_logprobs,
        safe_logmass=r.safe_logmass,
        safe_sizes=r.safe_sizes,
        safe_token_ids=r.safe_token_ids,
        outside_safe_set=r.outside_safe_set,
        stop_reason=r.stop_reason,
        policy_version=r.policy_version,
        seed=r.seed,
    )


def _dvp_info(resp: RolloutResponse) -> DvpInfo:
    return DvpInfo(
        engine=resp.engine,
        temperature=resp.temperature,
        pruning=resp.pruning,
        policy_version=resp.policy_version,
    )


Top = list[list[tuple[int, float | None]]]  # per step: (token id, log-prob), descending


class OpenAIService:
    """Serves the OpenAI routes with a :class:`RolloutService` (see the module docstring)."""

    def __init__(self, rollouts: RolloutService) -> None:
        self.rollouts = rollouts
        self.strings = TokenStrings(rollouts.tokenizer)

    async def completions(self, req: CompletionRequest, request_id: str) -> CompletionResponse:
        """``POST /v1/completions``.

        Raises:
            ServiceError, EngineError: as ``/v1/rollouts`` (and 501 for top-k log-probs
                on an engine that cannot score).
        """
        single = isinstance(req.prompt, str) or bool(req.prompt and isinstance(req.prompt[0], int))
        rename = _renamer("prompt" if single else "prompt.{i}")
        resp = await self._sample(completion_to_rollouts(req), request_id, rename)
        k = req.logprobs or 0
        tops = await self._top(resp, k, "logprobs") if k else None
        choices = [
            CompletionChoice(
                index=i,
                text=r.text or "",
                logprobs=self._completion_logprobs(r, tops[i] if tops else None)
                if req.logprobs is not None
                else None,
                finish_reason="length" if r.finish_reason == "length" else "stop",
                dvp=_dvp_choice(r),
            )
            for i, r in enumerate(resp.rollouts)
        ]
        return CompletionResponse(
            id=f"cmpl-{request_id}",
            created=int(time.time()),
            model=resp.model,
            choices=choices,
            usage=resp.usage,
            dvp=_dvp_info(resp),
        )

    async def chat(self, req: ChatCompletionRequest, request_id: str) -> ChatCompletionResponse:
        """``POST /v1/chat/completions``.

        Raises:
            ServiceError, EngineError: as ``/v1/rollouts`` (and 501 for top-k log-probs
                on an engine that cannot score).
        """
        sent = {"max_tokens": "max_completion_tokens"} if req.max_completion_tokens else {}
        rename = _renamer("messages", sent)  # a refused max_tokens is named as the client sent it
        resp = await self._sample(chat_to_rollouts(req), request_id, rename)
        k = (req.top_logprobs or 0) if req.logprobs else 0
        tops = await self._top(resp, k, "top_logprobs") if k else None
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=r.text or ""),
                logprobs=self._chat_logprobs(r, tops[i] if tops else None)
                if req.logprobs
                else None,
                finish_reason="length" if r.finish_reason == "length" else "stop",
                dvp=_dvp_choice(r),
            )
            for i, r in enumerate(resp.rollouts)
        ]
        return ChatCompletionResponse(
            id=f"chatcmpl-{request_id}",
            created=int(time.time()),
            model=resp.model,
            choices=choices,
            usage=resp.usage,
            dvp=_dvp_info(resp),
        )

    async def _sample(
        self, request: RolloutRequest, request_id: str, rename: Callable[[str], str]
    ) -> RolloutResponse:
        """The rollouts; a refusal names the OpenAI field (``max_tokens``, not
        ``sampling.max_tokens``)."""
        try:
            return await self.rollouts.create_rollouts(request, request_id)
        except ServiceError as exc:
            if exc.param is not None:
                param = rename(exc.param)
                exc.message = exc.message.replace(f"{exc.param}:", f"{param}:", 1)
                exc.param = param
            raise

    # --- log-probs ----------------------------------------------------------------------

    async def _top(self, resp: RolloutResponse, k: int, param: str) -> list[Top]:
        """The top-k tokens of every step of every rollout, by teacher forcing."""
        engine: Any = self.rollouts.engine
        if not engine.info.capabilities.score or not hasattr(engine, "score"):
            raise ServiceError(
                501,
                "not_implemented_error",
                f"{param}: top-k alternatives (k > 0) are recomputed by teacher forcing, "
                f"which the {engine.info.name} engine does not do; ask for k = 0",
                param,
            )
        seqs = [(r.prompt_token_ids, r.token_ids) for r in resp.rollouts]
        params = ScoreParams(temperature=resp.temperature, rule=resp.pruning, top_logprobs=k)
        scored = await engine.score(seqs, params)
        if any(
            s.policy_version != r.policy_version for s, r in zip(scored, resp.rollouts, strict=True)
        ):
            raise ServiceError(
                409, "conflict_error", f"{param}: the weights changed while sampling; retry"
            )
        out: list[Top] = []
        for s in scored:
            assert s.top_ids is not None and s.top_logprobs is not None
            out.append(
                [
                    [
                        (int(i), None if lp != lp else float(lp))
                        for i, lp in zip(ids, lps, strict=True)
                    ]
                    for ids, lps in zip(s.top_ids.tolist(), s.top_logprobs.tolist(), strict=True)
                ]
            )
        return out

    def _completion_logprobs(self, r: Rollout, top: Top | None) -> CompletionLogprobs:
        tokens = [self.strings(t)[0] for t in r.token_ids]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        top_dicts = None
        if top is not None:
            top_dicts = [
                {self.strings(i)[0]: lp for i, lp in step if lp is not None} for step in top
            ]
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=list(r.logprobs or [None] * r.num_tokens),
            top_logprobs=top_dicts,
            text_offset=offsets,
        )

    def _chat_logprobs(self, r: Rollout, top: Top | None) -> ChoiceLogprobs:
        full = r.logprobs or [None] * r.num_tokens
        content = []
        for t, (token, lp) in enumerate(zip(r.token_ids, full, strict=True)):
            text, raw = self.strings(token)
            alts = [
                TopLogprob(token=self.strings(i)[0], logprob=alp, bytes=self.strings(i)[1])
                for i, alp in (top[t] if top is not None else [])
            ]
            content.append(TokenLogprob(token=text, logprob=lp, bytes=raw, top_logprobs=alts))
        return ChoiceLogprobs(content=content)
