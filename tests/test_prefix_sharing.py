"""Shared prompt prefixes in the torch engine's prefill (engines/_prefix.py).

A batch whose prompts share a prefix runs it once (or takes it from the cache);
its logits, and the decode steps after it, must equal each prompt run alone in
float64 to float32 rounding, and a weight update must not reuse stale prefixes.
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from dvp_schemas import PruningRule
from dvp_server.engines.base import EngineParams
from dvp_server.engines.torch._batch import DecodeBatch
from dvp_server.engines.torch._prefix import MIN_SHARED, PrefixCache, common_prefix
from dvp_server.engines.torch.engine import TorchEngine
from transformers import AutoModelForCausalLM


class _Row:  # what DecodeBatch reads of a row
    def __init__(self, prompt: list[int]) -> None:
        self.prompt = prompt


def _prompts(seed: int, vocab: int) -> list[list[int]]:
    """5 prompts: a shared 12-token prefix, then 1-9 tokens of their own (one prompt twice)."""
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(5, vocab, (12,), generator=gen).tolist()
    out = [prefix + torch.randint(5, vocab, (int(n),), generator=gen).tolist() for n in (1, 9, 4)]
    return [*out, list(out[1]), [*prefix, 7]]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return model, copy.deepcopy(model).double()


def _alone(ref: Any, prompt: list[int], steps: list[int]) -> torch.Tensor:
    """float64 logits of ``prompt`` run alone, then of each step token: ``(1 + S, V)``."""
    ids = torch.tensor([prompt + steps])
    logits = ref(input_ids=ids).logits[0]  # (L, V)
    return logits[len(prompt) - 1 :]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("slack", [0, 64])
def test_shared_prefill_matches_each_prompt_alone(
    models: tuple[Any, Any], seed: int, slack: int
) -> None:
    model, ref = models
    prompts = _prompts(seed, model.config.vocab_size)
    assert common_prefix(prompts) == 12 >= MIN_SHARED
    cache = PrefixCache()
    steps = torch.randint(5, 1000, (len(prompts), 3), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        shared = DecodeBatch(model, [_Row(p) for p in prompts], pad_id=0, slack=slack)
        out = [shared.prefill(cache)]
        # the prefix once, then the 4 distinct prompts' suffixes (padded to 9); the
        # repeated prompt is copied, not run again
        assert shared.prefilled == 12 + 4 * 9
        for s in range(steps.shape[1]):
            out.append(shared.decode(steps[:, s].numpy()))
        again = DecodeBatch(model, [_Row(p) for p in prompts], pad_id=0, slack=slack)
        first = again.prefill(cache)  # the prefix from the cache
        assert again.prefilled == 4 * 9 and cache.hits == 1
        plain = DecodeBatch(model, [_Row(p) for p in prompts], pad_id=0, slack=slack)
        unshared = plain.prefill()  # no cache: the left-padded path
        assert plain.prefilled == len(prompts) * 21
        got = torch.stack(out, dim=1)  # (B, 1 + S, V)
        for i, p in enumerate(prompts):
            exact = _alone(ref, p, steps[i].tolist())
            assert _rel(got[i], exact) < 1e-5, i
        assert _rel(first, got[:, 0].double()) < 1e-6
        assert _rel(unshared, got[:, 0].double()) < 1e-5


def test_common_prefix_leaves_each_prompt_a_token() -> None:
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2]]) == 1
    assert common_prefix([[1, 2, 3], [4, 2, 3]]) == 0
    assert common_prefix([[5]]) == 0


def test_prefix_cache_is_bounded_and_lru() -> None:
    cache = PrefixCache(max_positions=10)
    kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    cache.put((1, 2, 3, 4), kv)
    cache.put((5, 6, 7, 8), kv)
    assert cache.get((1, 2, 3, 4)) is kv  # now the most recent
    cache.put((9, 9, 9, 9), kv)  # 12 positions > 10: the oldest, (5, 6, 7, 8), goes
    assert cache.get((5, 6, 7, 8)) is None
    assert cache.get((1, 2, 3, 4)) is kv and cache.positions == 8
    cache.put(tuple(range(11)), kv)  # longer than the bound: not kept
    assert cache.positions == 8
    cache.clear()
    assert cache.positions == 0


def test_engine_shares_prefixes_and_forgets_them_on_a_weight_update(
    tiny_model_dir: Path,
) -> None:
    """Four prompts with a common 25-token prefix, n = 2 each: the prefix runs once and
    each prompt's own tokens once; after new weights, the next group's log-probs are
    the new model's (float64 reference), not the stale prefix's."""
    base = list(range(100, 125))
    prompts = [[*base, 200 + i, 300 + i] for i in range(4)]
    params = EngineParams(temperature=1.0, max_tokens=1, rule=PruningRule(min_p=0.01), seed=3)

    async def group(eng: TorchEngine, tag: str) -> list[tuple[int, int, float]]:
        async def one(i: int, j: int) -> tuple[int, int, float]:
            async for chunk in eng.generate(f"{tag}{i}.{j}", prompts[i], params):
                return i, int(chunk.token_ids[0]), float(chunk.logprobs[0])
            raise AssertionError("no chunk")

        return list(await asyncio.gather(*(one(i, j) for i in range(4) for j in range(2))))

    def expected(eng: TorchEngine, i: int, token: int) -> float:
        ref = copy.deepcopy(eng.model).double()
        with torch.no_grad():
            logits = ref(input_ids=torch.tensor([prompts[i]])).logits[0, -1]
        return float(torch.log_softmax(logits, -1)[token])

    async def run() -> None:
        eng = TorchEngine(tiny_model_dir, max_batch=8, threads=1)
        await eng.start()
        try:
            before = eng.stats.prefill_tokens
            first = await group(eng, "a")
            assert eng.stats.prefill_tokens - before == 25 + 4 * 2  # prefix once, 2 tokens each
            assert eng.prefixes is not None and eng.prefixes.positions == 25
            assert all(abs(lp - expected(eng, i, t)) < 1e-4 for i, t, lp in first)
            gen = torch.Generator().manual_seed(11)
            layer0 = {k: v for k, v in eng.model.state_dict().items() if ".layers.0." in k}
            new = {k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in layer0.items()}
            await eng.load_weights(new)
            assert eng.prefixes.positions == 0
            after = await group(eng, "b")  # shared again: the prefix recomputed
            assert eng.prefixes.positions == 25
            diffs = [abs(lp - expected(eng, i, t)) for i, t, lp in after]
            assert max(diffs) < 1e-4, diffs
        finally:
            await eng.shutdown()

    asyncio.run(run())
