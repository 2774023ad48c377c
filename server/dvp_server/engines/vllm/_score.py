"""Teacher-forced scoring with vLLM: the given tokens forced through its own sampler.

vLLM's prompt log-probs skip the logits processors and give only a top-K, so
they cannot give the rule's exact sets. Instead a sequence is scored as one
generation request whose prompt is the sequence's prompt and whose
``max_tokens`` is its completion's length, tagged for
:class:`._processor.DvpRuleProcessor` with the completion as ``force``. At step t
the processor applies the rule (the request's temperature and rule, exactly as
for a rollout) to the logits that predict completion token ``y_t``, computes
``log p(y_t)``, ``log pi_S(y_t)`` (-inf when ``y_t`` is not in S_t), ``|S_t|``,
``log Z_S``, the ids of S_t and the top-n tokens of the full tempered
distribution, sends them (``_channel.py``), and then leaves only ``y_t``
finite, so vLLM (greedy, ``ignore_eos``) emits ``y_t`` and step t + 1 reads
the given sequence. Every field is exact at any temperature.

Cost: one decode step per completion token (vLLM batches concurrent
sequences), instead of one prefill: scoring is slower than on the torch
engine's single forward, the price of exact sets from the serving engine.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..base import EngineError
from ..scoring import ScoredSequence, ScoreParams
from ._args import rule_tag
from ._channel import StepChannel
from ._reload import version_salt

__all__ = ["score_with_vllm"]

_IDS = itertools.count()


async def score_with_vllm(
    llm: Any,
    channel: StepChannel,
    sequences: Sequence[tuple[list[int], list[int]]],
    params: ScoreParams,
    *,
    policy_version: int,
    lora_request: Any = None,
) -> list[ScoredSequence]:
    """Score every sequence concurrently (one vLLM request each).

    Args:
        llm: a running ``AsyncLLM``.
        channel: the engine's step channel (the processor's records).
        sequences: ``(prompt ids, completion ids)``, checked by the serving layer.
        params: temperature, the rule as sent, what to return.
        policy_version: reported in every result.
        lora_request: the policy adapter's ``LoRARequest`` (runtime LoRA), or None.

    Raises:
        EngineError: vLLM did not emit the forced tokens or the records did not come.
    """
    results = await asyncio.gather(
        *(_one(llm, channel, p, c, params, policy_version, lora_request) for p, c in sequences)
    )
    return [_assemble(recs, params, policy_version) for recs in results]


async def _one(
    llm: Any,
    channel: StepChannel,
    prompt: list[int],
    completion: list[int],
    params: ScoreParams,
    version: int,
    lora_request: Any,
) -> list[tuple[Any, ...]]:
    """The step records of one forced sequence (empty completion: none)."""
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    if not completion:
        return []
    key = f"score-{next(_IDS)}"
    tag = rule_tag(
        key,
        channel.addr,
        params.rule,
        temperature=params.temperature,
        with_ids=params.return_safe_token_ids,
        force=completion,
        top_n=params.top_logprobs,
    )
    sp = SamplingParams(
        max_tokens=len(completion),
        temperature=0.0,  # greedy over one finite logit: the forced token
        ignore_eos=True,
        detokenize=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
        extra_args=tag,
    )
    channel.register(key)
    final = None
    # salted with the served version: never a prefix block of older weights
    salt = version_salt(version)
    stream = llm.generate(
        TokensPrompt(prompt_token_ids=prompt, cache_salt=salt),
        sp,
        request_id=key,
        lora_request=lora_request,
    )
    try:
        async for out in stream:
            final = out
        emitted = list(final.outputs[0].token_ids) if final is not None else []
        if emitted != list(completion):
            raise EngineError(f"{key}: vLLM emitted {len(emitted)} tokens, not the forced ones")
        return await channel.take(key, 0, len(completion))
    finally:
        channel.unregister(key)
        await stream.aclose()


def _assemble(records: list[tuple[Any, ...]], params: ScoreParams, version: int) -> ScoredSequence:
    """Columns of one sequence from its step records (``_processor.step_records``)."""
    t = len(records)
    scores = [r[5] for r in records]
    in_s = np.fromiter((s[3] for s in scores), dtype=bool, count=t)
    sizes = np.fromiter((r[2] for r in records), dtype=np.int64, count=t)
    safe_ids = offsets = None
    if params.return_safe_token_ids:
        offsets = np.zeros(t + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        sets = [r[4] for r in records]
        safe_ids = np.concatenate(sets).astype(np.int32) if t else np.zeros(0, np.int32)
    top_ids = top_lps = None
    if params.top_logprobs:
        n = params.top_logprobs
        top_ids = np.stack([s[4] for s in scores]).astype(np.int64) if t else np.zeros((0, n))
        top_lps = np.stack([s[5] for s in scores]).astype(np.float32) if t else np.zeros((0, n))
    return ScoredSequence(
        logprobs=np.fromiter((s[1] for s in scores), dtype=np.float32, count=t),
        masked=np.fromiter((s[2] for s in scores), dtype=np.float32, count=t),
        in_safe_set=in_s,
        logmass=np.fromiter((r[3] for r in records), dtype=np.float32, count=t),
        sizes=sizes,
        safe_ids=safe_ids,
        safe_offsets=offsets,
        top_ids=top_ids,
        top_logprobs=top_lps,
        policy_version=version,
    )
