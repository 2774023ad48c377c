"""Teacher-forced scoring with vLLM: prompt log-probs + the shared rule on the top-K.

A sequence is scored as one vLLM request whose prompt is prompt + completion,
with ``prompt_logprobs=K`` and one generated token (thrown away). vLLM's
prompt log-probs are raw ``log_softmax(z)`` (prompt tokens skip the sampling
processors), one position per prompt token: row 0 is the token itself, the
last K rows the top-K (``FlatLogprobs``, the layout :func:`read_flat_topk`
reads). Position ``P + t`` of the joined prompt holds completion token t.

From the top-K of each step, exactly as the rollouts' derivation
(``_vllm_steps.py``): S = the rule on the K raw log-probs (exact since the
effective rule has ``top_k <= K``); ``masked = r_y / T - logsumexp_S r / T``
when y is in S, -inf (not in S) otherwise; ``logprob = r_y`` and
``logmass = logsumexp_S r`` at T in {0, 1} only (NaN otherwise: the full
normaliser at T != 1 needs all V logits); the top-k alternatives are the
first k of the top-K (log-probs at T = 1, NaN at other T).
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from dvp_client.train.rule import GREEDY_EPS, safe_vocab

from ..scoring import ScoredSequence, ScoreParams
from ._steps import TopK, read_flat_topk

__all__ = ["score_with_vllm"]

_IDS = itertools.count()


async def score_with_vllm(
    llm: Any,
    sequences: Sequence[tuple[list[int], list[int]]],
    params: ScoreParams,
    *,
    k: int,
    policy_version: int,
) -> list[ScoredSequence]:
    """Score every sequence concurrently (one vLLM request each).

    Args:
        llm: a running ``AsyncLLM``.
        sequences: ``(prompt ids, completion ids)``, checked by the serving layer.
        params: temperature, the effective rule (``top_k <= k``), what to return.
        k: K, the prompt log-probs per position (the engine's ``max_logprobs``).
        policy_version: reported in every result.
    """
    results = await asyncio.gather(*(_one(llm, p, c, k) for p, c in sequences))
    return [_derive(top, params, policy_version) for top in results]


async def _one(llm: Any, prompt: list[int], completion: list[int], k: int) -> TopK:
    from vllm import SamplingParams, TokensPrompt

    sp = SamplingParams(
        max_tokens=1,
        temperature=0.0,
        prompt_logprobs=k,
        flat_logprobs=True,
        detokenize=False,
    )
    request_id = f"score-{next(_IDS)}"
    joined = prompt + completion
    final = None
    stream = llm.generate(TokensPrompt(prompt_token_ids=joined), sp, request_id=request_id)
    try:
        async for out in stream:
            final = out
    finally:
        await stream.aclose()
    if final is None or final.prompt_logprobs is None:
        raise RuntimeError(f"vLLM returned no prompt log-probs for {request_id}")
    p = len(prompt)
    return read_flat_topk(final.prompt_logprobs, p, p + len(completion), k)


def _derive(top: TopK, params: ScoreParams, version: int) -> ScoredSequence:
    """Per-step fields of one sequence from its top-K (module docstring)."""
    t_, rule, temp = len(top.sampled), params.rule, params.temperature
    sv = safe_vocab(
        torch.from_numpy(top.lps),
        temperature=temp,
        min_p=rule.min_p,
        top_k=rule.top_k,
        top_p=rule.top_p,
    )
    mask = sv.mask.numpy()  # (T, K)
    in_s = (mask & (top.ids == top.sampled[:, None])).any(axis=1)  # (T,)
    greedy = temp < GREEDY_EPS  # the rule's and vLLM's greedy cut
    scale = 1.0 if greedy else 1.0 / temp
    log_z_s = sv.log_z_safe.numpy().astype(np.float64)  # logsumexp_S r / T
    u_y = top.sampled_lp.astype(np.float64) * scale
    masked = np.where(in_s, u_y - log_z_s, -math.inf).astype(np.float32)
    exact = greedy or temp == 1.0
    nan = np.full(t_, math.nan, dtype=np.float32)
    logprobs = top.sampled_lp.astype(np.float32) if exact else nan
    logmass = log_z_s.astype(np.float32) if exact else nan.copy()
    safe_ids = offsets = None
    if params.return_safe_token_ids:
        rows = [np.sort(top.ids[i][mask[i]]).astype(np.int32) for i in range(t_)]
        offsets = np.zeros(t_ + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=offsets[1:])
        safe_ids = np.concatenate(rows) if rows else np.zeros(0, np.int32)
    top_ids = top_lps = None
    if params.top_logprobs:
        n = params.top_logprobs
        top_ids = top.ids[:, :n].astype(np.int64)
        top_lps = (
            top.lps[:, :n].astype(np.float32) if exact else np.full((t_, n), np.nan, np.float32)
        )
    return ScoredSequence(
        logprobs=logprobs,
        masked=masked,
        in_safe_set=in_s,
        logmass=logmass,
        sizes=mask.sum(axis=1).astype(np.int64),
        safe_ids=safe_ids,
        safe_offsets=offsets,
        top_ids=top_ids,
        top_logprobs=top_lps,
        policy_version=version,
    )
