"""End to end over HTTP: the real ``dvp-serve`` (torch engine) and ``dvp_client``.

The tiny random Llama (tests/_models.py) serves every test but the last, which
uses the real SmolLM2-135M-Instruct (slow). Tolerances:

- ``masked == full - logmass``: the server computes the three in float32 from
  the same scaled logits, so they agree to float32 rounding: ``1e-5`` absolute.
- teacher-forced recomputation: a float32 forward of prompt + completion (no KV
  cache, no padding) through ``dvp_client.train.rule`` gives the same safe sets and
  log-probs within ``TF_ATOL = 5e-5``: the engine's batched, left-padded
  KV-cache forward sums in another order (float32 logits of magnitude ~10 carry
  ~1e-6 of rounding each; measured here: at most 4e-6, printed with ``-s``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from conftest import ServerProcess
from dvp_client import AsyncClient, Client, Rollout, RolloutBatch
from dvp_client.train.rule import SafeVocab, safe_vocab
from dvp_server.model_store import load_tokenizer

IDENTITY_ATOL = 1e-5
TF_ATOL = 5e-5
BOUNDARY = 1e-4  # a token this close to a rule threshold may fall either side
VOCAB = 49152  # SmolLM2's, used by the tiny model
CHAT = [{"role": "user", "content": "What is 7*8?"}]
MIXED_PROMPTS: list[Any] = ["The capital of France is", [1, 2, 3, 4, 5], CHAT]


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[Client]:
    with Client(server, timeout=120, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def tiny_hf_model(tiny_model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return model.eval()


def _sets_equal_away_from_thresholds(
    ref: list[list[int]], got: list[list[int]], sv: SafeVocab, pruning: dict[str, Any]
) -> np.ndarray:
    """Per step: True where the sets are equal. Where they differ, every token in
    the difference must sit within ``BOUNDARY`` of a rule threshold (min-p ratio in
    log space, or top-p's renormalised mass before it): batched and teacher-forced
    logits differ by ~1e-6, which can move such a token across, nothing else can.
    """
    assert len(ref) == len(got)
    same = np.ones(len(ref), dtype=bool)
    for t, (a, b) in enumerate(zip(ref, got, strict=True)):
        if a == b:
            continue
        same[t] = False
        u = sv.scaled[t].double()
        logp = u - torch.logsumexp(u, 0)
        near = torch.zeros_like(logp, dtype=torch.bool)
        if pruning.get("min_p"):
            near |= ((logp - logp.max()) - math.log(pruning["min_p"])).abs() < BOUNDARY
        if pruning.get("top_p", 1.0) < 1.0:
            order = torch.argsort(logp, descending=True)
            p = logp[order].exp()
            p = p / p.sum()
            before = torch.cumsum(p, 0) - p
            near[order] |= (before - pruning["top_p"]).abs() < BOUNDARY
        diff = set(a) ^ set(b)
        assert all(bool(near[v]) for v in diff), f"step {t}: sets differ away from a threshold"
    return same


def _csr_steps(r: Rollout) -> list[list[int]]:
    assert r.safe_token_ids is not None
    return [r.safe_token_ids.step(t) for t in range(r.num_tokens)]


def _check_rollout_arrays(r: Rollout) -> None:
    """Per-step arrays have one entry per token; CSR is consistent with safe_sizes."""
    t = r.num_tokens
    assert t >= 1
    assert r.logprobs is not None and r.safe_logmass is not None
    for name in ("logprobs", "masked_logprobs", "safe_logmass", "safe_sizes"):
        assert len(getattr(r, name)) == t, name
    csr = r.safe_token_ids
    assert csr is not None
    assert len(csr.offsets) == t + 1 and csr.offsets[0] == 0 and csr.offsets[-1] == len(csr.ids)
    # a whole-vocabulary set is the marker: an empty row (safe_sizes says V)
    want = [0 if n == VOCAB else n for n in r.safe_sizes]
    assert np.diff(csr.offsets).tolist() == want and csr.vocab_size == VOCAB
    for step, (y, ids) in enumerate(zip(r.token_ids, _csr_steps(r), strict=True)):
        assert ids == sorted(set(ids)), f"step {step}: ids not sorted/unique"
        assert all(0 <= v < VOCAB for v in ids)
        assert y in ids, f"step {step}: sampled token {y} not in its safe set"


def test_health_models_and_request_id(server: str, client: Client) -> None:
    health = client.health()
    assert (health.status, health.engine, health.engine_state) == ("ok", "torch", "running")
    assert health.policy_version == 0
    (card,) = client.models().data
    assert card.engine == "torch" and card.dtype == "float32"
    assert card.vocab_size == VOCAB and card.max_model_len == 512
    assert card.id == "model"  # the tiny model's directory name
    assert set(card.capabilities.fields) == {
        "token_ids",
        "logprobs",
        "masked_logprobs",
        "safe_logmass",
        "safe_sizes",
        "safe_token_ids",
    }
    assert card.capabilities.max_top_k is None
    r = httpx.get(f"{server}/health", headers={"X-Request-Id": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42"
    assert httpx.get(f"{server}/openapi.json").json()["paths"].keys() >= {
        "/v1/rollouts",
        "/v1/models",
        "/health",
    }


def test_n_samples_for_mixed_prompts(client: Client, tiny_tokenizer: Any) -> None:
    n, max_tokens = 3, 12
    batch = client.rollouts(
        MIXED_PROMPTS,
        n=n,
        max_tokens=max_tokens,
        seed=0,
        pruning={"min_p": 0.05},
        return_safe_token_ids=True,
    )
    assert isinstance(batch, RolloutBatch)
    assert [(r.prompt_index, r.sample_index) for r in batch.rollouts] == [
        (i, j) for i in range(3) for j in range(n)
    ]
    text_ids = tiny_tokenizer.encode(MIXED_PROMPTS[0], add_special_tokens=True)
    chat_text = tiny_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert chat_text.endswith("<|im_start|>assistant\n")
    chat_ids = tiny_tokenizer.encode(chat_text, add_special_tokens=False)
    expected_prompts = [text_ids, MIXED_PROMPTS[1], chat_ids]
    for r in batch.rollouts:
        assert r.prompt_token_ids == expected_prompts[r.prompt_index]
        assert 1 <= r.num_tokens <= max_tokens
        assert r.finish_reason == ("length" if r.num_tokens == max_tokens else "stop")
        assert r.policy_version == 0 and r.seed == 0
        assert r.text == tiny_tokenizer.decode(r.token_ids, skip_special_tokens=True)
        _check_rollout_arrays(r)
    for i in range(3):  # the n samples of a prompt are different draws
        samples = {tuple(r.token_ids) for r in batch.rollouts if r.prompt_index == i}
        assert len(samples) > 1
    completion = sum(r.num_tokens for r in batch.rollouts)
    prompt_tokens = sum(len(p) for p in expected_prompts)
    assert batch.usage.model_dump() == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
    assert batch.engine == "torch" and batch.pruning.min_p == 0.05


@pytest.mark.parametrize(
    ("temperature", "pruning"),
    [
        (1.0, {"min_p": 0.02}),
        (0.7, {"min_p": 0.1, "top_k": 20}),
        (1.3, {"top_p": 0.8}),
        (1.0, {}),
    ],
)
def test_logprob_identities_and_teacher_forcing(
    client: Client, tiny_hf_model: torch.nn.Module, temperature: float, pruning: dict[str, Any]
) -> None:
    batch = client.rollouts(
        MIXED_PROMPTS,
        n=2,
        max_tokens=16,
        temperature=temperature,
        seed=7,
        pruning=pruning,
        return_safe_token_ids=True,
    )
    worst = 0.0
    for r in batch.rollouts:
        _check_rollout_arrays(r)
        full = np.array(r.logprobs, dtype=np.float64)
        masked = np.array(r.masked_logprobs, dtype=np.float64)
        logmass = np.array(r.safe_logmass, dtype=np.float64)
        np.testing.assert_allclose(masked, full - logmass, rtol=0, atol=IDENTITY_ATOL)
        assert (logmass <= 1e-6).all() and (masked <= 1e-6).all()
        if not pruning:  # nothing pruned: S = V, Z_S = 1
            assert r.safe_sizes == [VOCAB] * r.num_tokens
            np.testing.assert_allclose(logmass, 0.0, atol=IDENTITY_ATOL)
        # Teacher forcing: one fp32 forward of prompt + completion, the rule on its logits.
        ids = torch.tensor([r.prompt_token_ids + r.token_ids])
        with torch.no_grad():
            logits = tiny_hf_model(ids).logits[0].float()  # (P + T, V)
        p = len(r.prompt_token_ids)
        step_logits = logits[p - 1 : p - 1 + r.num_tokens]  # (T, V): predicts each y_t
        sv = safe_vocab(step_logits, temperature=temperature, **pruning)
        ref_full, ref_masked = sv.logprobs(torch.tensor(r.token_ids))
        ref_sets = [torch.nonzero(row).squeeze(-1).tolist() for row in sv.mask]
        same = _sets_equal_away_from_thresholds(ref_sets, _csr_steps(r), sv, pruning)
        for name, got, ref in (("masked", masked, ref_masked), ("full", full, ref_full)):
            keep = same if name == "masked" else np.ones_like(same)  # Z_S moves with S
            dev = float(np.abs(got - ref.double().numpy())[keep].max())
            worst = max(worst, dev)
            assert dev <= TF_ATOL, f"{name} log-probs deviate by {dev:.2e} > {TF_ATOL}"
    print(f"max |server - teacher-forced| = {worst:.2e}")


def test_seeds_reproduce(client: Client) -> None:
    kw: dict[str, Any] = {"n": 3, "max_tokens": 10, "pruning": {"min_p": 0.01}}
    a = client.rollouts(MIXED_PROMPTS, seed=123, **kw)
    b = client.rollouts(MIXED_PROMPTS, seed=123, **kw)
    c = client.rollouts(MIXED_PROMPTS, seed=124, **kw)
    assert [r.token_ids for r in a.rollouts] == [r.token_ids for r in b.rollouts]
    assert [r.masked_logprobs for r in a.rollouts] == [r.masked_logprobs for r in b.rollouts]
    assert [r.token_ids for r in a.rollouts] != [r.token_ids for r in c.rollouts]
    # A prompt's samples do not depend on its position in the batch or its batch mates.
    d = client.rollouts([MIXED_PROMPTS[2], "Another prompt", MIXED_PROMPTS[0]], seed=123, **kw)
    assert [r.token_ids for r in d.rollouts if r.prompt_index == 0] == [
        r.token_ids for r in a.rollouts if r.prompt_index == 2
    ]
    assert [r.token_ids for r in d.rollouts if r.prompt_index == 2] == [
        r.token_ids for r in a.rollouts if r.prompt_index == 0
    ]


def test_unseeded_requests_echo_a_seed_that_replays_them(client: Client) -> None:
    kw: dict[str, Any] = {"n": 2, "max_tokens": 10}
    a = client.rollouts(MIXED_PROMPTS[:1], seed=None, **kw)
    b = client.rollouts(MIXED_PROMPTS[:1], seed=None, **kw)
    seed = a.rollouts[0].seed
    assert seed is not None and all(r.seed == seed for r in a.rollouts)
    assert b.rollouts[0].seed != seed
    assert [r.token_ids for r in a.rollouts] != [r.token_ids for r in b.rollouts]
    replay = client.rollouts(MIXED_PROMPTS[:1], seed=seed, **kw)
    assert [r.token_ids for r in replay.rollouts] == [r.token_ids for r in a.rollouts]


def test_finish_reasons_and_stops(client: Client, tiny_tokenizer: Any) -> None:
    kw: dict[str, Any] = {"n": 4, "max_tokens": 24, "seed": 5, "ignore_eos": True}
    base = client.rollouts(["Once upon a time"], **kw)
    assert all(r.finish_reason == "length" and r.num_tokens == 24 for r in base.rollouts)
    assert all(r.stop_reason is None for r in base.rollouts)

    # A stop token id: the rollout ends at its first occurrence, the token included.
    ref = base.rollouts[0]
    stop_id = ref.token_ids[5]
    first = ref.token_ids.index(stop_id)
    got = client.rollouts(["Once upon a time"], stop_token_ids=[stop_id], **kw).rollouts[0]
    assert got.token_ids == ref.token_ids[: first + 1]
    assert (got.finish_reason, got.stop_reason) == ("stop", stop_id)

    # A stop string taken from the middle of the text: the text stops before it;
    # the token ids run up to the token that completed it.
    stop, cut = _stop_string_from(ref, tiny_tokenizer)
    got = client.rollouts(["Once upon a time"], stop=[stop], **kw).rollouts[0]
    assert (got.finish_reason, got.stop_reason) == ("stop", stop)
    assert got.text == (ref.text or "")[:cut]
    assert got.token_ids == ref.token_ids[: len(got.token_ids)]
    decoded = tiny_tokenizer.decode(got.token_ids, skip_special_tokens=True)
    assert stop in decoded and stop not in decoded[: len(got.text or "")] + stop[:-1]


def _stop_string_from(r: Rollout, tokenizer: Any) -> tuple[str, int]:
    """A 2-character string of ``r.text`` whose first occurrence starts after token 4."""
    text = r.text or ""
    start = len(tokenizer.decode(r.token_ids[:4], skip_special_tokens=True))
    for cut in range(start, len(text) - 2):
        s = text[cut : cut + 2]
        if text.find(s) == cut and s.strip():
            return s, cut
    pytest.fail(f"no usable stop string in {text!r}")


def test_greedy_is_argmax_with_one_token_sets(client: Client) -> None:
    batch = client.rollouts(
        MIXED_PROMPTS, n=2, temperature=0.0, max_tokens=8, seed=1, return_safe_token_ids=True
    )
    for r in batch.rollouts:
        assert r.safe_sizes == [1] * r.num_tokens
        assert all(math.isclose(m, 0.0, abs_tol=1e-6) for m in r.masked_logprobs)
        _check_rollout_arrays(r)
    by_prompt = {r.prompt_index: r.token_ids for r in batch.rollouts if r.sample_index == 0}
    assert all(r.token_ids == by_prompt[r.prompt_index] for r in batch.rollouts)


def test_concurrent_requests_may_share_a_request_id(server: str) -> None:
    """Two in-flight requests with the same X-Request-Id are both served (the engine's
    rollout ids are made unique server side) and both get the id echoed."""

    async def both() -> list[RolloutBatch]:
        async with AsyncClient(server, timeout=120, max_retries=0) as c:
            calls = [
                c.rollouts(
                    MIXED_PROMPTS, n=2, max_tokens=6, seed=s, extra_headers={"X-Request-Id": "same"}
                )
                for s in (1, 2)
            ]
            return list(await asyncio.gather(*calls))

    a, b = asyncio.run(both())
    assert a.id == b.id == "same"
    assert len(a.rollouts) == len(b.rollouts) == 6
    assert [r.token_ids for r in a.rollouts] != [r.token_ids for r in b.rollouts]


def test_client_disconnect_aborts_its_rollouts(tiny_server: ServerProcess) -> None:
    """A client that gives up cancels its rollouts in the engine.

    The abandoned request (32 rollouts x 400 tokens) takes about 90 s here. The
    torch engine decodes one batch at a time, so a request that arrives while
    the abandoned batch still runs waits for it to finish; with the abort it is
    served at once.
    """
    url = f"{tiny_server.base_url}/v1/rollouts"
    big = {
        "prompts": ["a", "b", "c", "d"],
        "n": 8,
        "sampling": {"max_tokens": 400, "seed": 1, "ignore_eos": True},
    }
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url, json=big, headers={"X-Request-Id": "gone-1"}, timeout=1.5)
    t0 = time.monotonic()
    small = {"prompts": ["a"], "sampling": {"max_tokens": 1, "seed": 1}}
    r = httpx.post(url, json=small, timeout=120)
    elapsed = time.monotonic() - t0
    assert r.status_code == 200
    assert elapsed < 30, f"the next request waited {elapsed:.1f} s: the rollouts ran on"
    deadline = time.monotonic() + 10
    while "gone-1." not in tiny_server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(x for x in tiny_server.log().splitlines() if "gone-1." in x)
    assert "32 rollouts aborted (cancelled)" in line


@pytest.mark.slow
def test_smollm2_chat_rollouts(smollm2_server: str) -> None:
    """The real model: a chat prompt, n=4, 64 tokens, min_p=1e-3 (the issue's example)."""
    with Client(smollm2_server, timeout=600, max_retries=0) as c:
        (card,) = c.models().data
        batch = c.rollouts(
            [CHAT],
            n=4,
            max_tokens=64,
            seed=0,
            pruning={"min_p": 1e-3},
            return_safe_token_ids=True,
        )
    assert card.vocab_size == VOCAB and card.engine == "torch"
    assert len(batch.rollouts) == 4
    pruned_steps = 0
    for r in batch.rollouts:
        _check_rollout_arrays(r)
        full, masked = np.array(r.logprobs), np.array(r.masked_logprobs)
        np.testing.assert_allclose(masked, full - np.array(r.safe_logmass), atol=IDENTITY_ATOL)
        assert r.finish_reason in ("stop", "length") and r.text
        assert max(r.safe_sizes) < VOCAB  # min_p = 1e-3 prunes the tail at every step
        pruned_steps += sum(s < VOCAB for s in r.safe_sizes)
    answers = [r.text or "" for r in batch.rollouts]
    print(answers)
    assert any("56" in a for a in answers), answers  # 2 of 4 with seed 0 here
    assert pruned_steps == sum(r.num_tokens for r in batch.rollouts)
