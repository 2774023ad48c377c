"""Continuous batching and the KV cache budget of the torch engine (tiny random Llama).

A rollout admitted into a running batch (prefilled as its own mini-batch, its KV
cache merged into the running one, left-padded) must give the tokens it gives in
a fresh batch: each row draws from its own seeded generator. Log-probs may
differ by float rounding of the padded attention; measured here against each
other (``PATH_ATOL``) and against the teacher-forced fp32 / float64-rule
reference of ``test_torch_engine`` (``LOGPROB_ATOL``).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dvp_server.config import ServerConfig
from dvp_server.engines.base import RolloutChunk
from dvp_server.engines.factory import build_engine
from dvp_server.engines.torch._batch import DecodeBatch
from dvp_server.engines.torch._rows import Row
from dvp_server.engines.torch.engine import TorchEngine
from dvp_server.errors import ServiceError
from test_torch_engine import (
    Result,
    check_against_reference,
    collect,
    params,
    teacher_forced,
    to_result,
    together,
)

#: Admitted into a running batch vs a fresh batch, same rollout: max |d log p| (fp32;
#: each path is within ~1e-5 of the float64 reference, so up to twice that apart).
PATH_ATOL = 2e-5  # measured 3e-6 .. 1e-5 over the cases below


# tiny_dir, engine, ref_model: conftest.py


async def _long_running(eng: TorchEngine, jobs: list[tuple[str, list[int], Any]]) -> list[Any]:
    """Start ``jobs`` as one batch and return their streams once each has sent a chunk."""
    gens = [eng.generate(*job) for job in jobs]
    with eng._cond:  # all pending before the scheduler looks: one batch
        firsts = [asyncio.ensure_future(g.__anext__()) for g in gens]
        while len(eng._pending) < len(jobs):
            await asyncio.sleep(0)
    await asyncio.gather(*firsts)
    return gens


def _order_of_finish(eng: TorchEngine, long_tokens: int) -> tuple[list[str], list[list[str]]]:
    """A long rollout runs; a short one arrives 16 steps in. Which finishes first?"""
    order: list[str] = []
    forwards: list[list[str]] = []

    async def run(rid: str, prompt: list[int], p: Any, first: asyncio.Event | None) -> None:
        async for c in eng.generate(rid, prompt, p):
            if first is not None:
                first.set()
            if c.finish_reason is not None:
                order.append(rid)

    async def scenario() -> None:
        started = asyncio.Event()
        long = asyncio.ensure_future(
            run("long", [5, 6, 7, 8], params(seed=1, max_tokens=long_tokens), started)
        )
        await started.wait()  # the long batch is 16 steps in
        eng.step_hook = lambda ids: forwards.append(list(ids))
        await run("short", [9, 10], params(seed=2, max_tokens=8), None)
        await long

    try:
        asyncio.run(scenario())
    finally:
        eng.step_hook = None
    return order, forwards


def test_short_rollout_joins_the_running_batch(engine: TorchEngine) -> None:
    before = (engine.stats.batches, engine.stats.prefills, engine.stats.merged)
    order, forwards = _order_of_finish(engine, long_tokens=200)
    assert order == ["short", "long"]  # without continuous batching it waits 184 steps
    stats = (engine.stats.batches, engine.stats.prefills, engine.stats.merged)
    assert [a - b for a, b in zip(stats, before, strict=True)] == [1, 2, 1]
    # The newcomer's own prefill, then both rows decode together until "short" ends.
    start = forwards.index(["short"])
    assert forwards[start + 1 : start + 8] == [["long", "short"]] * 7
    assert forwards[start + 8] == ["long"] and ["short"] not in forwards[start + 1 :]
    assert len(forwards) < 200 - 16 + 2  # nobody waited for the long batch to end


def test_without_continuous_batching_the_short_rollout_waits(tiny_dir: Path) -> None:
    eng = TorchEngine(tiny_dir, max_batch=8, threads=1, continuous_batching=False)
    asyncio.run(eng.start())
    try:
        order, forwards = _order_of_finish(eng, long_tokens=60)
    finally:
        asyncio.run(eng.shutdown())
    assert order == ["long", "short"]
    assert eng.stats.batches == 2 and eng.stats.merged == 0
    assert all(len(f) == 1 for f in forwards)


def _random_jobs(rng: np.random.Generator, tag: str, lens: list[int], **kw: Any) -> list[Any]:
    rules = [{"min_p": 0.05}, {"min_p": 1e-3, "top_k": 20}, {"min_p": 0.1, "top_p": 0.7}]
    return [
        (
            f"{tag}{i}",
            rng.integers(3, 49152, size=n).tolist(),
            params(
                seed=int(rng.integers(1 << 31)),
                temperature=float(rng.choice([0.6, 1.0, 1.4])),
                rule=rules[i % len(rules)],
                return_safe_token_ids=True,
                **kw,
            ),
        )
        for i, n in enumerate(lens)
    ]


@pytest.mark.parametrize(
    ("seed", "lens"),
    [(0, [3, 60, 17]), (1, [60, 41]), (2, [3, 5]), (3, [2, 8, 6])],  # the last two: < K
)
def test_admitted_rows_equal_a_fresh_batch(
    engine: TorchEngine, ref_model: Any, seed: int, lens: list[int]
) -> None:
    """Newcomers shorter and longer than the running batch's cache (padding on either
    side) give the same tokens and sets as in a fresh batch; log-probs within
    ``PATH_ATOL`` of each other and of the teacher-forced reference."""
    rng = np.random.default_rng(seed)
    # Running: prompts of 4-12 tokens, 16+ steps in (cache K >= 20); newcomers longer than
    # K (the running cache is left-padded), shorter (theirs is), or both.
    running = _random_jobs(rng, "run", [int(rng.integers(4, 13)) for _ in range(2)],
                           max_tokens=300)  # fmt: skip
    newcomers = _random_jobs(rng, "new", lens, max_tokens=24)
    fresh = asyncio.run(together(engine, newcomers))

    async def admitted() -> list[Any]:
        gens = await _long_running(engine, running)
        merged = engine.stats.merged
        out = await together(engine, newcomers)
        assert engine.stats.merged - merged == len(newcomers)  # joined the running batch
        for g in gens:
            await g.aclose()  # abort the long rows
        return out

    joined = asyncio.run(admitted())
    worst = 0.0
    for job, a, b in zip(newcomers, fresh, joined, strict=True):
        assert isinstance(a, Result) and isinstance(b, Result)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.sizes, b.sizes)
        assert a.safe_sets is not None and b.safe_sets is not None
        for sa, sb in zip(a.safe_sets, b.safe_sets, strict=True):
            np.testing.assert_array_equal(sa, sb)
        for name in ("logprobs", "masked", "logmass"):
            worst = max(worst, float(np.abs(getattr(a, name) - getattr(b, name)).max()))
        check_against_reference(b, teacher_forced(ref_model, job[1], b.tokens), job[2])
    print(f"admitted vs fresh batch: max |d logp| = {worst:.2e}")
    assert worst < PATH_ATOL


def test_kv_bytes_per_token_is_the_cache_size(engine: TorchEngine) -> None:
    """2 * layers * kv_heads * head_dim * 4 bytes (fp32): tiny model 2 * 2 * 2 * 16 * 4."""
    assert engine.kv.bytes_per_token == 512
    r = _row(engine, [5, 6, 7])
    s = _row(engine, [8] * 9)
    batch = DecodeBatch(engine.model, [r, s], engine.pad_id, slack=engine.kv.slack)
    with torch.inference_mode():
        batch.prefill()
    held = sum(
        t.untyped_storage().nbytes()
        for layer in batch.cache.layers
        for t in (layer.keys, layer.values)
        if t is not None
    )
    assert held == batch.cached_positions * engine.kv.bytes_per_token == 2 * (9 + 64) * 512


def _row(engine: TorchEngine, prompt: list[int]) -> Row:
    loop = asyncio.new_event_loop()
    try:
        return Row("r", prompt, params(), loop, asyncio.Queue(), engine.eos_ids, None)
    finally:
        loop.close()


def test_kv_budget_bounds_the_batch(tiny_dir: Path) -> None:
    """Budget for 2 rows of 50 positions (+ 64 spare each): 6 rollouts run at most 2 at
    a time, all finish, the cache never exceeds the budget; a rollout that cannot fit
    alone is refused."""
    cfg = ServerConfig(engine="torch", kv_cache_bytes=2 * (50 + 64) * 512 + 100, threads=1)
    eng = build_engine(cfg, tiny_dir)
    assert isinstance(eng, TorchEngine) and eng.kv.budget_bytes == cfg.kv_cache_bytes
    sizes: list[int] = []
    eng.on_step = sizes.append
    jobs = [(f"b{i}", [5 + i] * 10, params(seed=i, max_tokens=20 + 4 * i)) for i in range(6)]

    async def scenario() -> list[Any]:
        await eng.start()
        try:
            out = await together(eng, jobs)
            with pytest.raises(ValueError, match="kv_cache_bytes budget") as info:
                await collect(eng, "huge", [5] * 10, params(max_tokens=200))
            assert isinstance(info.value, ServiceError) and info.value.status == 422
            return out
        finally:
            await eng.shutdown()

    results = asyncio.run(scenario())
    assert [len(r.tokens) for r in results] == [20 + 4 * i for i in range(6)]
    assert max(sizes) == 2 and eng.stats.merged > 0  # rows joined as others left
    assert 0 < eng.stats.kv_peak_bytes <= cfg.kv_cache_bytes


def test_chunks_of_a_merged_row(engine: TorchEngine) -> None:
    """A row admitted mid-batch streams its chunks like any other (16 steps each)."""

    async def scenario() -> list[RolloutChunk]:
        gens = await _long_running(engine, [("bg", [5, 6], params(seed=3, max_tokens=300))])
        chunks = [c async for c in engine.generate("mid", [7, 8, 9], params(max_tokens=40))]
        await gens[0].aclose()
        return chunks

    res = to_result(asyncio.run(scenario()))
    assert [len(c.token_ids) for c in res.chunks] == [16, 16, 8]
    assert res.finish_reason == "length"


def test_slack_cache_equals_the_plain_cache(engine: TorchEngine, tiny_dir: Path) -> None:
    """KV buffers with spare room (written in place) give the same tokens as
    transformers' concatenating DynamicLayer, across joins and departures; log-probs
    within float rounding (attention reads strided views: another kernel path)."""
    plain = TorchEngine(tiny_dir, max_batch=8, threads=1, kv_slack=0)
    rng = np.random.default_rng(5)
    jobs = _random_jobs(rng, "s", [4, 30, 9, 17], max_tokens=100)
    jobs = [(rid, prompt, replace(p, max_tokens=20 + 25 * i)) for i, (rid, prompt, p) in
            enumerate(jobs)]  # fmt: skip
    late = _random_jobs(rng, "late", [12, 3], max_tokens=90)  # joins after slack runs out

    async def scenario(eng: TorchEngine) -> list[Any]:
        await eng.start()
        first = asyncio.ensure_future(together(eng, jobs))
        while eng.stats.steps < 70:
            await asyncio.sleep(0.001)
        second = await together(eng, late)
        return [*(await first), *second]

    a = asyncio.run(scenario(engine))
    b = asyncio.run(scenario(plain))
    asyncio.run(plain.shutdown())
    assert plain.stats.merged == 2
    worst = 0.0
    for ra, rb in zip(a, b, strict=True):
        assert isinstance(ra, Result) and isinstance(rb, Result)
        np.testing.assert_array_equal(ra.tokens, rb.tokens)
        worst = max(worst, float(np.abs(ra.logprobs - rb.logprobs).max()))
    print(f"slack vs plain cache: max |d logp| = {worst:.2e}")
    assert worst < PATH_ATOL


def test_newcomers_join_a_half_full_batch_in_groups(tiny_dir: Path) -> None:
    """Into a batch at least half full, one newcomer waits (up to MERGE_WAIT_STEPS turns)
    for a group of a quarter of max_batch; into a less than half full one it joins at once."""
    eng = TorchEngine(tiny_dir, max_batch=8, threads=1)
    eng._pending.append(_row(eng, [5, 6]))
    waits = [eng._defer(running=6) for _ in range(eng.MERGE_WAIT_STEPS + 1)]
    assert waits == [True] * eng.MERGE_WAIT_STEPS + [False]
    assert not eng._defer(running=3)  # less than half full: at once
    eng._pending.append(_row(eng, [7]))
    assert not eng._defer(running=6)  # a group of 2 = 8 / 4
    assert eng._defer(running=8)  # no free slot
