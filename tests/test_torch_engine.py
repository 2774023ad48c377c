"""The torch engine, driven directly with asyncio (tiny random Llama; SmolLM2 marked slow).

Numeric references: a float64 numpy version of the rule applied to a
teacher-forced fp32 forward of prompt + completion in a separately loaded model.
Tolerances (fp32 engine vs that reference): log-probs and log Z_S within
``LOGPROB_ATOL`` = 2e-4 absolute (max seen on the tiny model: ~2e-6; on SmolLM2: ~2e-5);
safe sets identical except where a token lies within ``EDGE`` of a rule boundary.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dvp_schemas import PruningRule
from dvp_server.engines.base import Engine, EngineError, EngineParams, RolloutChunk
from dvp_server.engines.torch.engine import TorchEngine, default_threads
from transformers import AutoModelForCausalLM

LOGPROB_ATOL = 2e-4
EDGE = 1e-4
PROMPTS = [
    "The quick brown fox",
    "Hello",
    "One two three four five six seven eight nine ten eleven twelve",
    "A",
]


# ------------------------------------------------------------------ fixtures


# tiny_dir, engine, ref_model: conftest.py


def params(**kw: Any) -> EngineParams:
    rule = PruningRule(**kw.pop("rule", {"min_p": 0.05}))
    base = {"temperature": 1.0, "max_tokens": 24, "seed": 0, "ignore_eos": True}
    return EngineParams(rule=rule, **{**base, **kw})


@dataclass
class Result:
    """A rollout's chunks concatenated."""

    tokens: np.ndarray
    logprobs: np.ndarray
    masked: np.ndarray
    logmass: np.ndarray
    sizes: np.ndarray
    safe_sets: list[np.ndarray] | None
    finish_reason: str | None
    stop_reason: str | int | None
    chunks: list[RolloutChunk]


def to_result(chunks: list[RolloutChunk]) -> Result:
    cat = lambda name: np.concatenate([getattr(c, name) for c in chunks])  # noqa: E731
    sets = None
    if chunks[0].safe_ids is not None:
        sets = [  # an empty row is the whole vocabulary (then safe_sizes is V)
            c.safe_ids[c.safe_offsets[t] : c.safe_offsets[t + 1]]
            if c.safe_offsets[t + 1] > c.safe_offsets[t]
            else np.arange(c.safe_sizes[t], dtype=np.int32)
            for c in chunks
            if c.safe_ids is not None and c.safe_offsets is not None
            for t in range(len(c.token_ids))
        ]
    last = chunks[-1]
    return Result(
        cat("token_ids"), cat("logprobs"), cat("masked_logprobs"), cat("safe_logmass"),
        cat("safe_sizes"), sets, last.finish_reason, last.stop_reason, chunks,
    )  # fmt: skip


async def collect(eng: TorchEngine, rid: str, prompt: list[int], p: EngineParams) -> Result:
    return to_result([c async for c in eng.generate(rid, prompt, p)])


async def together(eng: TorchEngine, jobs: list[tuple[str, list[int], EngineParams]]) -> list[Any]:
    """Submit every job before the scheduler can start a batch, so they share one.

    Holds the engine's condition (an RLock, so generate can take it from this
    thread) until every job is pending; errors are returned, not raised.
    """
    with eng._cond:
        tasks = [asyncio.ensure_future(collect(eng, *job)) for job in jobs]
        while len(eng._pending) < len(jobs) and not all(t.done() for t in tasks):
            await asyncio.sleep(0)
    return list(await asyncio.gather(*tasks, return_exceptions=True))


def encode(eng: TorchEngine, text: str) -> list[int]:
    return list(eng.tokenizer(text)["input_ids"])


# ------------------------------------------------------- float64 reference


def ref_rule(z: np.ndarray, p: EngineParams) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """The rule in float64 for one step's logits ``z`` (V,).

    Returns ``(log p (V,), mask (V,), log Z_S, margin (V,))``; margin is each
    token's distance to the min-p boundary in log space (how close a set
    decision is to flipping).
    """
    z = z.astype(np.float64)
    greedy = p.temperature == 0
    u = z if greedy else z / p.temperature
    logp = u - (u.max() + np.log(np.exp(u - u.max()).sum()))
    rho = p.rule.min_p
    margin = logp - logp.max() - (np.log(rho) if rho > 0 else -np.inf)
    keep = margin >= 0
    if p.rule.top_k:
        kth = np.sort(u[keep])[::-1][min(p.rule.top_k, int(keep.sum())) - 1]
        keep &= u >= kth
    if p.rule.top_p < 1:
        idx = np.flatnonzero(keep)
        order = idx[np.argsort(-u[idx], kind="stable")]
        probs = np.exp(logp[order] - logp[order].max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        keep = np.zeros_like(keep)
        keep[order[(before < p.rule.top_p) | (np.arange(len(order)) == 0)]] = True
    if greedy:
        keep = np.zeros_like(keep)
        keep[np.argmax(z)] = True
    log_z = float(np.log(np.exp(logp[keep]).sum()))
    return logp, keep, log_z, margin


def teacher_forced(model: Any, prompt: list[int], tokens: np.ndarray) -> np.ndarray:
    """fp32 logits ``(T, V)`` predicting each completion token, from one forward."""
    ids = torch.tensor([prompt + tokens.tolist()], dtype=torch.int64)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)].numpy()


def check_against_reference(res: Result, logits: np.ndarray, p: EngineParams) -> float:
    """Assert every per-step field against the float64 rule; return the max abs error."""
    err = 0.0
    for t, y in enumerate(res.tokens):
        logp, keep, log_z, margin = ref_rule(logits[t], p)
        assert keep[y], f"step {t}: sampled token {y} not in the reference safe set"
        err = max(err, abs(res.logprobs[t] - logp[y]), abs(res.logmass[t] - log_z))
        err = max(err, abs(res.masked[t] - (logp[y] - log_z)))
        if res.safe_sets is not None and not np.any(np.abs(margin) < EDGE):
            np.testing.assert_array_equal(res.safe_sets[t], np.flatnonzero(keep), f"step {t}")
            assert res.sizes[t] == keep.sum()
    print(f"max abs error vs float64 reference: {err:.2e}")
    assert err < LOGPROB_ATOL, f"max abs error {err:.2e} over tolerance {LOGPROB_ATOL}"
    return err


# ---------------------------------------------------------------- the tests


def test_satisfies_engine_protocol(engine: TorchEngine) -> None:
    assert isinstance(engine, Engine)
    assert engine.state == "running"
    assert engine.policy_version == 0
    info = engine.info
    assert info.name == "torch" and info.vocab_size == 49152 and info.max_model_len == 512
    assert set(info.capabilities.exact_at_any_temperature) == set(info.capabilities.fields)
    assert "safe_token_ids" in info.capabilities.fields
    assert 2 in info.eos_token_ids


@pytest.mark.parametrize(
    "kw",
    [
        {"rule": {"min_p": 0.05}},
        {"rule": {"min_p": 1e-3}, "temperature": 0.7},
        {"rule": {"min_p": 0.01, "top_k": 5, "top_p": 0.8}, "temperature": 1.3},
        {"rule": {}, "temperature": 1.0},  # nothing pruned: log Z_S = 0
    ],
)
def test_metadata_matches_teacher_forced_float64_reference(
    engine: TorchEngine, ref_model: Any, kw: dict[str, Any]
) -> None:
    prompt = encode(engine, PROMPTS[0])
    p = params(return_safe_token_ids=True, max_tokens=40, seed=7, **kw)
    res = asyncio.run(collect(engine, "ref", prompt, p))
    assert len(res.tokens) == 40 and res.finish_reason == "length"
    # The sampled token is in its own step's safe set, and the CSR is consistent.
    assert res.safe_sets is not None
    for t, y in enumerate(res.tokens):
        assert y in res.safe_sets[t] and len(res.safe_sets[t]) == res.sizes[t]
    np.testing.assert_allclose(res.masked, res.logprobs - res.logmass, atol=1e-5)
    assert np.all(res.logmass <= 0)
    if not PruningRule(**kw["rule"]).prunes:
        assert np.all(res.sizes == engine.vocab_size) and np.all(res.logmass == 0)
    else:
        assert np.all(res.sizes < engine.vocab_size)
    check_against_reference(res, teacher_forced(ref_model, prompt, res.tokens), p)


def test_seeded_rollouts_reproduce(engine: TorchEngine) -> None:
    prompt = encode(engine, PROMPTS[1])
    a = asyncio.run(collect(engine, "a", prompt, params(seed=123)))
    b = asyncio.run(collect(engine, "b", prompt, params(seed=123)))
    c = asyncio.run(collect(engine, "c", prompt, params(seed=124)))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.masked, b.masked)
    assert not np.array_equal(a.tokens, c.tokens)


def test_batched_rows_equal_each_alone(engine: TorchEngine) -> None:
    """Rows of different lengths and parameters in one batch give the tokens each
    gives alone (padding and batch mates do not change a row's draws); log-probs
    agree to float rounding (batched vs single matmuls)."""
    rules = [{"min_p": 0.05}, {"min_p": 1e-3, "top_k": 20}, {"min_p": 0.1, "top_p": 0.7}, {}]
    jobs = [
        (f"row{i}", encode(engine, text), params(
            seed=100 + i, max_tokens=10 + 9 * i, temperature=[1.0, 0.6, 1.5, 0.0][i],
            rule=rules[i], return_safe_token_ids=i % 2 == 0,
        ))
        for i, text in enumerate(PROMPTS)
    ]  # fmt: skip
    batches: list[list[str]] = []
    engine.step_hook = lambda ids: batches.append(list(ids))
    try:
        together_res = asyncio.run(together(engine, jobs))
    finally:
        engine.step_hook = None
    assert sorted(batches[0]) == sorted(j[0] for j in jobs)  # one batch, all four rows
    # Finished rows leave the batch: at step s only rows with max_tokens > s remain.
    maxes = [j[2].max_tokens for j in jobs]
    assert [len(b) for b in batches] == [sum(m > s for m in maxes) for s in range(max(maxes))]
    for job, res in zip(jobs, together_res, strict=True):
        alone = asyncio.run(collect(engine, *job))
        assert isinstance(res, Result)
        assert len(res.tokens) == job[2].max_tokens
        assert (res.safe_sets is not None) == job[2].return_safe_token_ids  # ids only if asked
        np.testing.assert_array_equal(res.tokens, alone.tokens)
        np.testing.assert_array_equal(res.sizes, alone.sizes)
        np.testing.assert_allclose(res.masked, alone.masked, atol=1e-5)
        np.testing.assert_allclose(res.logprobs, alone.logprobs, atol=1e-5)


def test_greedy_is_argmax(engine: TorchEngine, ref_model: Any) -> None:
    prompt = encode(engine, PROMPTS[2])
    p = params(temperature=0.0, rule={"min_p": 0.5}, return_safe_token_ids=True)
    res = asyncio.run(collect(engine, "greedy", prompt, p))
    logits = teacher_forced(ref_model, prompt, res.tokens)
    np.testing.assert_array_equal(res.tokens, logits.argmax(-1))
    assert np.all(res.sizes == 1) and np.all(res.masked == 0)
    check_against_reference(res, logits, p)  # logprobs at T = 1 for greedy rows
    other = asyncio.run(collect(engine, "greedy2", prompt, replace(p, seed=99)))
    np.testing.assert_array_equal(res.tokens, other.tokens)  # the seed is irrelevant


def test_stop_string_ends_the_rollout(engine: TorchEngine) -> None:
    prompt = encode(engine, PROMPTS[0])
    free = asyncio.run(collect(engine, "free", prompt, params(seed=5, max_tokens=30)))
    tok = engine.tokenizer
    text = tok.decode(free.tokens.tolist(), skip_special_tokens=True)
    piece = tok.decode(free.tokens[12:14].tolist(), skip_special_tokens=True)
    stop = piece[1:] if len(piece) > 2 else piece  # a string that straddles a token edge
    assert stop and stop in text
    expect = next(t for t in range(1, 31) if stop in tok.decode(free.tokens[:t].tolist()))
    res = asyncio.run(collect(engine, "stop", prompt, params(seed=5, max_tokens=30, stop=(stop,))))
    assert res.finish_reason == "stop" and res.stop_reason == stop
    np.testing.assert_array_equal(res.tokens, free.tokens[:expect])


def test_stop_token_ids_and_max_tokens(engine: TorchEngine) -> None:
    prompt = encode(engine, PROMPTS[3])
    free = asyncio.run(collect(engine, "free", prompt, params(seed=9, max_tokens=20)))
    assert free.finish_reason == "length" and len(free.tokens) == 20
    target = int(free.tokens[6])
    first = int(np.flatnonzero(free.tokens == target)[0])
    p = params(seed=9, max_tokens=20, stop_token_ids=(target,))
    res = asyncio.run(collect(engine, "stopid", prompt, p))
    assert res.finish_reason == "stop" and res.stop_reason == target
    np.testing.assert_array_equal(res.tokens, free.tokens[: first + 1])


@pytest.fixture(scope="module")
def eos_engine(
    tiny_dir: Path, engine: TorchEngine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TorchEngine, int, int]]:
    """A copy of the tiny model whose generation config adds a sampled token to the
    eos ids (as real models list several), served with a 64-token context."""
    prompt = encode(engine, PROMPTS[3])
    free = asyncio.run(collect(engine, "free", prompt, params(seed=3, max_tokens=30)))
    eos = int(free.tokens[8])
    first = int(np.flatnonzero(free.tokens == eos)[0])
    d = tmp_path_factory.mktemp("tiny_eos")
    shutil.copytree(tiny_dir, d, dirs_exist_ok=True)
    cfg = json.loads((d / "generation_config.json").read_text())
    cfg["eos_token_id"] = [2, eos]
    (d / "generation_config.json").write_text(json.dumps(cfg))
    eng = TorchEngine(d, max_batch=4, max_model_len=64)
    asyncio.run(eng.start())
    yield eng, eos, first
    asyncio.run(eng.shutdown())


def test_eos_from_generation_config(eos_engine: tuple[TorchEngine, int, int]) -> None:
    eng, eos, first = eos_engine
    assert eos in eng.info.eos_token_ids
    prompt = encode(eng, PROMPTS[3])
    res = asyncio.run(collect(eng, "eos", prompt, params(seed=3, max_tokens=30, ignore_eos=False)))
    assert res.finish_reason == "stop" and res.stop_reason is None
    assert len(res.tokens) == first + 1 and res.tokens[-1] == eos
    res = asyncio.run(collect(eng, "noeos", prompt, params(seed=3, max_tokens=30)))
    assert res.finish_reason == "length" and len(res.tokens) == 30


def test_context_length_ends_and_bounds_prompts(eos_engine: tuple[TorchEngine, int, int]) -> None:
    eng = eos_engine[0]
    assert eng.max_model_len == 64
    res = asyncio.run(collect(eng, "ctx", list(range(100, 150)), params(max_tokens=100)))
    assert res.finish_reason == "length" and len(res.tokens) == 64 - 50
    with pytest.raises(ValueError, match="context is 64"):
        asyncio.run(collect(eng, "long", list(range(100, 164)), params()))
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\] = 49152"):
        asyncio.run(collect(eng, "oov", [5, 49152], params()))
    with pytest.raises(ValueError, match="must not be empty"):
        asyncio.run(collect(eng, "empty", [], params()))


def test_abort_and_close_free_the_row(engine: TorchEngine) -> None:
    prompt = encode(engine, PROMPTS[0])
    long_p = params(seed=1, max_tokens=400)
    mate = ("mate", encode(engine, PROMPTS[1]), params(seed=2, max_tokens=40))

    async def scenario() -> tuple[list[RolloutChunk], Result, int]:
        mate_task = asyncio.ensure_future(collect(engine, *mate))
        gen = engine.generate("victim", prompt, long_p)
        first = await gen.__anext__()  # 16 steps in
        await engine.abort("victim")
        rest = [c async for c in gen]
        closer = engine.generate("closer", prompt, long_p)
        await closer.__anext__()
        await closer.aclose()  # the client went away
        for _ in range(500):
            if "closer" not in engine._rows:
                break
            await asyncio.sleep(0.01)
        return [first, *rest], await mate_task, len(engine._rows)

    chunks, mate_res, left = asyncio.run(scenario())
    assert chunks[-1].finish_reason == "abort"
    assert 16 <= sum(len(c.token_ids) for c in chunks) < 400
    assert left == 0
    alone = asyncio.run(collect(engine, *mate))  # the batch mate was not disturbed
    np.testing.assert_array_equal(mate_res.tokens, alone.tokens)


def test_step_error_fails_only_its_batch(tiny_dir: Path) -> None:
    eng = TorchEngine(tiny_dir, max_batch=2)

    def hook(ids: Any) -> None:
        if "bad" in ids:
            raise RuntimeError("injected fault")

    async def scenario() -> list[Any]:
        await eng.start()
        eng.step_hook = hook
        jobs = [
            ("bad", encode(eng, PROMPTS[0]), params(seed=1)),
            ("mate", encode(eng, PROMPTS[1]), params(seed=2)),
            ("next", encode(eng, PROMPTS[2]), params(seed=3)),  # the next batch
        ]
        out = await together(eng, jobs)
        out.append(await collect(eng, "after", encode(eng, PROMPTS[3]), params(seed=4)))
        await eng.shutdown()
        return out

    bad, mate, nxt, after = asyncio.run(scenario())
    for err in (bad, mate):
        assert isinstance(err, EngineError) and "injected fault" in str(err)
    for ok in (nxt, after):
        assert isinstance(ok, Result) and ok.finish_reason == "length"
    assert eng.state == "dead"


def test_scheduler_death_fails_its_rows_and_start_restarts_it(tiny_dir: Path) -> None:
    """An error outside a step ends the scheduler thread: its rows fail (no caller
    hangs), the state is 'dead', and start() brings up a new thread on the same model."""
    eng = TorchEngine(tiny_dir, max_batch=4)
    real_admit = eng._admit
    calls = {"n": 0}

    def admit_once_then_die() -> Any:
        calls["n"] += 1
        if calls["n"] == 3:  # a later turn, with both rollouts decoding
            raise RuntimeError("injected scheduler fault")
        return real_admit()

    async def scenario() -> tuple[list[Any], str, Result, Result]:
        await eng.start()
        reference = await collect(eng, "ref", encode(eng, PROMPTS[0]), params(seed=11))
        calls["n"] = 0
        eng._admit = admit_once_then_die  # type: ignore[method-assign]
        jobs = [
            ("a", encode(eng, PROMPTS[0]), params(seed=11, max_tokens=200)),
            ("b", encode(eng, PROMPTS[1]), params(seed=12, max_tokens=200)),
        ]
        failed = await asyncio.wait_for(together(eng, jobs), timeout=60)
        state = eng.state
        eng._admit = real_admit  # type: ignore[method-assign]
        await eng.shutdown()  # what the supervisor does: shutdown, then start
        await eng.start()
        again = await collect(eng, "again", encode(eng, PROMPTS[0]), params(seed=11))
        await eng.shutdown()
        return failed, state, reference, again

    failed, state, reference, again = asyncio.run(scenario())
    for err in failed:
        assert isinstance(err, EngineError) and "scheduler died" in str(err)
        assert "injected scheduler fault" in str(err)
    assert state == "dead"
    assert again.finish_reason == "length"
    np.testing.assert_array_equal(again.tokens, reference.tokens)  # same model, same seed


def test_chunks_flush_every_16_steps(engine: TorchEngine) -> None:
    res = asyncio.run(collect(engine, "flush", encode(engine, "x"), params(max_tokens=40)))
    assert [len(c.token_ids) for c in res.chunks] == [16, 16, 8]
    assert [c.finish_reason for c in res.chunks] == [None, None, "length"]


def test_default_threads_leave_one_core(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No --threads: every usable core but one (the event loop's), at least one."""
    for cores, want in (({0, 1}, 1), ({0}, 1), (set(range(16)), 15)):
        monkeypatch.setattr("os.sched_getaffinity", lambda _pid, c=cores: c)
        assert default_threads() == want
    before = torch.get_num_threads()
    try:
        assert TorchEngine(tiny_dir, max_batch=2).threads == 15  # the patched 16 cores
    finally:
        torch.set_num_threads(before)  # the engine set it for this thread too


def test_duplicate_request_id_is_refused(engine: TorchEngine) -> None:
    async def scenario() -> None:
        gen = engine.generate("dup", [5, 6], params(max_tokens=100))
        await gen.__anext__()
        try:
            with pytest.raises(ValueError, match="already in use"):
                await collect(engine, "dup", [5, 6], params())
        finally:
            await gen.aclose()

    asyncio.run(scenario())


@pytest.mark.slow
def test_smollm2_rollout_matches_reference() -> None:
    from dvp_server.model_store import resolve_model

    path = resolve_model()
    eng = TorchEngine(path, max_batch=4)
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    msgs = [{"role": "user", "content": "What is 7*8?"}]
    prompt = list(eng.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"])
    p = params(rule={"min_p": 1e-3}, max_tokens=32, seed=0, ignore_eos=False, temperature=0.8,
               return_safe_token_ids=True)  # fmt: skip

    async def scenario() -> list[Any]:
        await eng.start()
        jobs = [(f"s{i}", prompt, replace(p, seed=i)) for i in range(3)]
        out = await together(eng, jobs)
        await eng.shutdown()
        return out

    results = asyncio.run(scenario())
    for res in results:
        assert isinstance(res, Result)
        assert res.finish_reason in ("stop", "length")
        assert np.all(res.sizes < 2000)  # a trained model: min-p prunes hard
        np.testing.assert_allclose(res.masked, res.logprobs - res.logmass, atol=1e-5)
        check_against_reference(res, teacher_forced(ref, prompt, res.tokens), p)
