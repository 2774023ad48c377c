"""``POST /v1/score`` against the real server (torch engine, tiny model).

Tolerances:

- scoring a rollout's own tokens reproduces its per-step fields within
  ``ROLLOUT_ATOL = 1e-5``: the same float32 model, once decoded with a KV cache
  in a left-padded batch, once teacher-forced in another batch (rounding of
  float32 logits of magnitude ~10; measured here: ~6e-6); safe sets and sizes
  are equal;
- against a float64 reference (the tiny model in float64, the rule and
  log-probs of ``_dvp_reference``, one step at a time): ``F64_ATOL = 5e-5``
  (the server's float32 forward); safe sets equal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
import torch
from _dvp_reference import rule_set, step_logprobs
from dvp_client import Client, ScoreResponse
from dvp_schemas import SafeTokenIds
from dvp_server.api.app import create_app
from dvp_server.config import ServerConfig
from fastapi.testclient import TestClient

ROLLOUT_ATOL = 1e-5
F64_ATOL = 5e-5
VOCAB = 49152
PROMPTS: list[Any] = [
    "The capital of France is",
    [1, 2, 3, 4, 5],
    [{"role": "user", "content": "Hi"}],
]


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[Client]:
    with Client(server, timeout=120, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def f64_model(tiny_model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float64)
    return model.eval()


def _arr(values: list[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


@pytest.mark.parametrize(
    ("temperature", "pruning", "seed"),
    [
        (1.0, {"min_p": 0.02}, 0),
        (0.7, {"min_p": 0.1, "top_k": 20}, 1),
        (1.3, {"top_p": 0.8}, 2),
        (1.0, {}, 3),
        (0.0, {}, 4),
    ],
)
def test_scoring_a_rollout_reproduces_it(
    client: Client, temperature: float, pruning: dict[str, Any], seed: int
) -> None:
    batch = client.rollouts(
        PROMPTS,
        n=2,
        max_tokens=24,
        temperature=temperature,
        seed=seed,
        pruning=pruning,
        return_safe_token_ids=True,
    )
    scored = client.score(
        [(r.prompt_token_ids, r.token_ids) for r in batch.rollouts],
        temperature=temperature,
        pruning=pruning,
        return_safe_token_ids=True,
    )
    assert isinstance(scored, ScoreResponse)
    assert scored.temperature == temperature and scored.policy_version == 0
    worst = 0.0
    for r, s in zip(batch.rollouts, scored.results, strict=True):
        assert s.token_ids == r.token_ids
        assert all(s.in_safe_set), "a sampled token is outside its recomputed safe set"
        assert s.safe_sizes == r.safe_sizes
        assert s.safe_token_ids == r.safe_token_ids
        for name in ("masked_logprobs", "logprobs", "safe_logmass"):
            dev = float(np.abs(_arr(getattr(s, name)) - _arr(getattr(r, name))).max())
            worst = max(worst, dev)
            assert dev <= ROLLOUT_ATOL, f"{name}: score deviates by {dev:.2e}"
    print(f"max |score - rollout| = {worst:.2e}")


def _reference(
    model: torch.nn.Module,
    prompt: list[int],
    completion: list[int],
    t: float,
    rule: dict[str, Any],
) -> list[dict[str, Any]]:
    """Float64 per-step reference: one forward of the sequence, the rule step by step."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0]  # (P + T, V) float64
    steps = logits[len(prompt) - 1 : len(prompt) - 1 + len(completion)].numpy()
    out = []
    for z, y in zip(steps, completion, strict=True):
        s = rule_set(z, t, rule.get("min_p", 0.0), rule.get("top_k"), rule.get("top_p", 1.0))
        lp = step_logprobs(z, s, y, t)
        tt = 1.0 if t == 0 else t
        u = z / tt
        top = np.argsort(-u, kind="stable")[:3]
        full = u - np.log(np.exp(u - u.max()).sum()) - u.max()
        out.append(
            {**lp, "set": np.flatnonzero(s).tolist(), "in": bool(s[y]), "top": top, "f": full}
        )
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_score_matches_a_float64_reference(
    client: Client, f64_model: torch.nn.Module, seed: int
) -> None:
    """Random completions (most tokens outside S): values, sets, flags, top-3."""
    rng = np.random.default_rng(seed)
    t = [1.0, 0.8, 1.5][seed]
    rule = [{"min_p": 0.05}, {"min_p": 0.01, "top_k": 30}, {"top_p": 0.9}][seed]
    seqs = [
        (
            rng.integers(0, VOCAB, size=int(rng.integers(1, 9))).tolist(),
            rng.integers(0, VOCAB, size=int(rng.integers(1, 13))).tolist(),
        )
        for _ in range(4)
    ]
    res = client.score(
        seqs, temperature=t, pruning=rule, return_safe_token_ids=True, top_logprobs=3
    )
    outside = 0
    for (prompt, completion), s in zip(seqs, res.results, strict=True):
        ref = _reference(f64_model, prompt, completion, t, rule)
        assert s.safe_token_ids is not None and s.top_logprobs is not None
        for step, r in enumerate(ref):
            assert s.safe_token_ids.step(step) == r["set"]
            assert s.safe_sizes[step] == len(r["set"])
            assert s.in_safe_set[step] == r["in"]
            if r["in"]:
                assert abs(s.masked_logprobs[step] - r["masked"]) <= F64_ATOL  # type: ignore[operator]
            else:
                assert s.masked_logprobs[step] is None
                outside += 1
            assert abs(s.logprobs[step] - r["full"]) <= F64_ATOL  # type: ignore[index,operator]
            assert abs(s.safe_logmass[step] - r["log_z"]) <= F64_ATOL  # type: ignore[index,operator]
            assert s.top_logprobs.ids[step] == r["top"].tolist()
            np.testing.assert_allclose(
                s.top_logprobs.logprobs[step], r["f"][r["top"]], rtol=0, atol=F64_ATOL
            )
    assert outside > 0, "random tokens should fall outside the safe sets"


def test_batching_does_not_change_scores(client: Client) -> None:
    """A sequence scores the same alone and among others of other lengths."""
    rng = np.random.default_rng(7)
    seqs = [
        (rng.integers(0, VOCAB, size=n).tolist(), rng.integers(0, VOCAB, size=m).tolist())
        for n, m in ((3, 5), (40, 2), (1, 30), (12, 12))
    ]
    together = client.score(seqs, pruning={"min_p": 0.01}).results
    for seq, joint in zip(seqs, together, strict=True):
        alone = client.score([seq], pruning={"min_p": 0.01}).results[0]
        np.testing.assert_allclose(
            _arr(joint.logprobs or []), _arr(alone.logprobs or []), atol=1e-5
        )
        assert joint.safe_sizes == alone.safe_sizes and joint.in_safe_set == alone.in_safe_set


def test_async_client_scores_the_same(server: str, client: Client) -> None:
    import asyncio

    from dvp_client import AsyncClient

    seqs = [([1, 2, 3], [4, 5, 6, 7]), ([9], [10, 11])]
    kw: dict[str, Any] = {"temperature": 0.9, "pruning": {"top_p": 0.9}, "top_logprobs": 2}

    async def run() -> ScoreResponse:
        async with AsyncClient(server, timeout=60, max_retries=0, msgpack=True) as c:
            return await c.score(seqs, **kw)

    got = asyncio.run(run())
    assert got.results == client.score(seqs, **kw).results


def test_score_over_msgpack(server: str) -> None:
    body = {"sequences": [{"prompt_token_ids": [1, 2], "completion_token_ids": [3, 4, 5]}]}
    as_json = httpx.post(f"{server}/v1/score", json=body, timeout=60).json()
    r = httpx.post(
        f"{server}/v1/score",
        content=msgpack.packb(body),
        headers={"content-type": "application/msgpack", "accept": "application/msgpack"},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/msgpack"
    got = msgpack.unpackb(r.content)
    assert got["results"] == as_json["results"]


def _seq(p: Any = (1, 2), c: Any = (3, 4)) -> dict[str, Any]:
    return {"prompt_token_ids": list(p), "completion_token_ids": list(c)}


BAD: list[tuple[str, dict[str, Any], int, str | None, str]] = [
    ("no-sequences", {"sequences": []}, 422, "sequences", "at least 1"),
    ("empty-completion", {"sequences": [_seq(c=())]}, 422, "sequences.0.completion_token_ids", ""),
    ("empty-prompt", {"sequences": [_seq(p=())]}, 422, "sequences.0.prompt_token_ids", ""),
    (
        "completion-id-outside",
        {"sequences": [_seq(), _seq(c=(5, VOCAB))]},
        422,
        "sequences.1.completion_token_ids.1",
        "vocabulary",
    ),
    (
        "prompt-id-negative",
        {"sequences": [_seq(p=(-1,))]},
        422,
        "sequences.0.prompt_token_ids.0",
        "vocabulary",
    ),
    ("too-long", {"sequences": [_seq(p=[1] * 500, c=[2] * 20)]}, 422, "sequences.0", "context"),
    ("too-many", {"sequences": [_seq()] * 65}, 422, "sequences", "limit"),
    ("unknown-field", {"sequences": [_seq()], "temprature": 1}, 422, "temprature", "unknown"),
    ("top-logprobs-over", {"sequences": [_seq()], "top_logprobs": 21}, 422, "top_logprobs", "20"),
    ("bad-rule", {"sequences": [_seq()], "pruning": {"top_p": 0}}, 422, "pruning.top_p", ""),
    ("huge-top-k", {"sequences": [_seq()], "pruning": {"top_k": 2**70}}, 422, "pruning.top_k", ""),
    ("model", {"sequences": [_seq()], "model": "gpt-4"}, 404, "model", "not served"),
]


@pytest.mark.parametrize(
    ("body", "status", "param", "text"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_score_requests(
    server: str, body: dict[str, Any], status: int, param: str | None, text: str
) -> None:
    r = httpx.post(f"{server}/v1/score", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == (status, param)
    assert text in err["message"]


def test_engine_without_scoring_answers_501(tiny_model_dir: Path) -> None:
    """The torch engine with its score capability switched off: 501, advertised in /v1/models."""
    app = create_app(ServerConfig(model=str(tiny_model_dir), engine="torch", max_batch=2))
    with TestClient(app, raise_server_exceptions=False) as c:
        engine = app.state.engine  # type: ignore[attr-defined]
        caps = engine.info.capabilities.model_copy(update={"score": False})
        engine.info = dataclasses.replace(engine.info, capabilities=caps)
        assert c.get("/v1/models").json()["data"][0]["capabilities"]["score"] is False
        r = c.post("/v1/score", json={"sequences": [_seq()]})
        assert r.status_code == 501
        assert r.json()["error"]["type"] == "not_implemented_error"
        assert "does not score" in r.json()["error"]["message"]


@pytest.mark.vllm
@pytest.mark.parametrize(
    ("temperature", "pruning"),
    [(1.0, {"min_p": 1e-3}), (0.7, {"min_p": 0.01, "top_k": 50, "top_p": 0.95})],
)
def test_vllm_score_reproduces_its_rollouts(
    vllm_server: Any, temperature: float, pruning: dict[str, Any]
) -> None:
    """The vLLM engine scores by forcing the tokens through its sampler's rule.

    Scoring a rollout's own tokens gives its sets and its masked, full log-probs
    and log Z_S (the same float32 logits and rule code: within ROLLOUT_ATOL) at
    any temperature, with the rule as sent (no cap). Random tokens: ``in_safe_set``
    says whether each lies in its returned set; masked is null outside S, full
    log-probs are finite; a sequence too long for the context is a 422.
    """
    with Client(vllm_server.base_url, timeout=300, max_retries=0) as c:
        assert c.models().data[0].capabilities.score
        batch = c.rollouts(
            PROMPTS[:2],
            n=2,
            max_tokens=24,
            temperature=temperature,
            seed=0,
            pruning=pruning,
            return_safe_token_ids=True,
        )
        rng = np.random.default_rng(1)
        seqs = [(r.prompt_token_ids, r.token_ids) for r in batch.rollouts]
        seqs.append(([5, 6, 7], rng.integers(0, VOCAB, 10).tolist()))
        res = c.score(
            seqs,
            temperature=temperature,
            pruning=pruning,
            return_safe_token_ids=True,
            top_logprobs=2,
        )
        assert res.engine == "vllm" and res.pruning.model_dump() == batch.pruning.model_dump()
        assert res.pruning.top_k == pruning.get("top_k")
        for r, s in zip(batch.rollouts, res.results[:-1], strict=True):
            assert all(s.in_safe_set)
            for name in ("masked_logprobs", "logprobs", "safe_logmass"):
                got, ref = _arr(getattr(s, name)), _arr(getattr(r, name))
                assert float(np.abs(got - ref).max()) <= ROLLOUT_ATOL, name
            assert s.safe_token_ids is not None and isinstance(r.safe_token_ids, SafeTokenIds)
            steps = range(r.num_tokens)
            assert all(s.safe_token_ids.step(t) == r.safe_token_ids.step(t) for t in steps)
        rand = res.results[-1]
        assert rand.safe_token_ids is not None and not all(rand.in_safe_set)
        for t, y in enumerate(seqs[-1][1]):
            assert rand.in_safe_set[t] == (y in rand.safe_token_ids.step(t))
            assert (rand.masked_logprobs[t] is None) == (not rand.in_safe_set[t])
        assert np.isfinite(_arr(rand.logprobs or [])).all()
        too_long = httpx.post(
            f"{vllm_server.base_url}/v1/score",
            json={"sequences": [_seq(p=[1] * 500, c=[2] * 12)]},
            timeout=60,
        )
        assert too_long.status_code == 422
        assert too_long.json()["error"]["param"] == "sequences.0"
