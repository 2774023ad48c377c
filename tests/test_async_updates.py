"""In-flight weight updates (async RL): ``keep`` and ``recompute`` on the torch engine.

A rollout is decoding when new weights (a perturbed copy of the tiny model) load;
it continues, and every token says which version sampled it and which version its
keys / values are from. Checked against references built here, not the engine:

- keep: plain transformers, the prompt and the tokens before the switch cached
  with the OLD weights, the rest teacher-forced through the NEW weights over that
  cache: the engine's ``log p`` of every token equals it (1e-4; fp32, padding and
  summation order only), and the new-weights-over-fresh-KV forward does NOT (so the
  check can tell the two apart);
- recompute: every token's masked log-prob and safe set equal a teacher-forced
  score under that token's version (the engine's own scorer, weights of that
  version loaded), within 1e-5;
- no token lost (``max_tokens`` reached), versions non-decreasing, a rollout of one
  version keeps one span, and a seeded rollout with no update in flight is unchanged;
- over HTTP: a request in flight across a ``keep`` update returns both versions in
  its spans, a request sent during the update is admitted, nothing drains.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from _ops import own_server
from dvp_schemas import PruningRule
from dvp_server.engines.base import EngineParams, RolloutChunk
from dvp_server.engines.scoring import ScoreParams
from dvp_server.engines.torch.engine import TorchEngine
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DynamicCache

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]
TOKENS = 48
RULE = PruningRule(min_p=0.02)


def perturbed(model_dir: Path, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = load_file(str(model_dir / "model.safetensors"))
    return {k: v + scale * v.std() * torch.randn(v.shape, generator=g) for k, v in sd.items()}


def params(seed: int = 5) -> EngineParams:
    return EngineParams(
        temperature=1.0, max_tokens=TOKENS, rule=RULE, seed=seed, ignore_eos=True,
        return_safe_token_ids=True,
    )  # fmt: skip


async def decode_across_update(
    engine: TorchEngine, new: Path, recompute: bool, after: int = 10
) -> list[RolloutChunk]:
    """One rollout; once ``after`` tokens arrived the weights ``new`` load in flight."""
    chunks: list[RolloutChunk] = []
    got = 0
    loaded = None
    async for c in engine.generate("r", PROMPT, params()):
        chunks.append(c)
        got += len(c.token_ids)
        if loaded is None and got >= after:
            loaded = asyncio.ensure_future(engine.load_weights([new], recompute=recompute))
    assert loaded is not None
    await loaded
    return chunks


def joined(chunks: list[RolloutChunk]) -> dict[str, np.ndarray]:
    pv = np.concatenate([c.versions()[0] for c in chunks])
    kv = np.concatenate([c.versions()[1] for c in chunks])
    return {
        "tokens": np.concatenate([c.token_ids for c in chunks]),
        "logprobs": np.concatenate([c.logprobs for c in chunks]),
        "masked": np.concatenate([c.masked_logprobs for c in chunks]),
        "sizes": np.concatenate([c.safe_sizes for c in chunks]),
        "pv": pv,
        "kv": kv,
    }


@pytest.fixture
def slow_engine(tiny_model_dir: Path) -> TorchEngine:
    """A torch engine whose steps take >= 5 ms, so an update lands mid-rollout."""
    eng = TorchEngine(tiny_model_dir, max_batch=8, threads=1, flush_every=4)
    eng.step_hook = lambda ids: time.sleep(0.005)
    return eng


def hf(model_dir: Path, file: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    model.load_state_dict(load_file(str(file)))
    return model


def test_keep_matches_old_kv_then_new_weights(
    slow_engine: TorchEngine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    new = tmp_path / "new.safetensors"
    save_file(perturbed(tiny_model_dir, 1), str(new))

    async def run() -> list[RolloutChunk]:
        await slow_engine.start()
        try:
            return await decode_across_update(slow_engine, new, recompute=False)
        finally:
            await slow_engine.shutdown()

    r = joined(asyncio.run(run()))
    assert len(r["tokens"]) == TOKENS  # nothing lost
    assert np.all(np.diff(r["pv"]) >= 0) and set(r["pv"]) == {0, 1}
    assert np.all(r["kv"] == 0)  # keep: every token read the prefill's (old) keys / values
    s = int(np.argmax(r["pv"] == 1))  # the first token the new weights sampled
    assert 0 < s < TOKENS
    old, cur = hf(tiny_model_dir, tiny_model_dir / "model.safetensors"), hf(tiny_model_dir, new)
    y = r["tokens"].tolist()
    with torch.no_grad():
        cache = DynamicCache(config=old.config)
        ctx = PROMPT + y[: s - 1]  # positions whose KV the old weights computed
        first = old(torch.tensor([ctx]), past_key_values=cache, use_cache=True).logits[0]
        rest = cur(torch.tensor([y[s - 1 : -1]]), past_key_values=cache, use_cache=True).logits[0]
        fresh = cur(torch.tensor([PROMPT + y[:-1]])).logits[0, len(PROMPT) - 1 :]
    logits = torch.cat([first[len(PROMPT) - 1 :], rest])  # (T, V): predicts y_0 .. y_{T-1}
    ref = torch.log_softmax(logits.double(), -1)[torch.arange(TOKENS), torch.tensor(y)]
    assert np.max(np.abs(r["logprobs"] - ref.numpy())) < 1e-4
    fresh_ref = torch.log_softmax(fresh.double(), -1)[torch.arange(TOKENS), torch.tensor(y)]
    assert np.max(np.abs(r["logprobs"][s + 1 :] - fresh_ref.numpy()[s + 1 :])) > 1e-3


def test_recompute_equals_teacher_forcing_under_each_tokens_version(
    slow_engine: TorchEngine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    new = tmp_path / "new.safetensors"
    save_file(perturbed(tiny_model_dir, 2), str(new))
    orig = tiny_model_dir / "model.safetensors"
    sp = ScoreParams(temperature=1.0, rule=RULE, return_safe_token_ids=True)

    async def run() -> tuple[list[RolloutChunk], object, object]:
        await slow_engine.start()
        try:
            chunks = await decode_across_update(slow_engine, new, recompute=True)
            y = joined(chunks)["tokens"].tolist()
            under_new = (await slow_engine.score([(PROMPT, y)], sp))[0]
            await slow_engine.load_weights([orig])
            under_old = (await slow_engine.score([(PROMPT, y)], sp))[0]
            return chunks, under_new, under_old
        finally:
            await slow_engine.shutdown()

    chunks, under_new, under_old = asyncio.run(run())
    r = joined(chunks)
    assert len(r["tokens"]) == TOKENS and set(r["pv"]) == {0, 1}
    assert np.all(r["kv"] == r["pv"])  # recompute: a token's KV is its own version's
    s = int(np.argmax(r["pv"] == 1))
    for part, ref in ((slice(0, s), under_old), (slice(s, TOKENS), under_new)):
        assert np.max(np.abs(r["masked"][part] - ref.masked[part])) < 1e-5  # type: ignore[attr-defined]
        assert np.array_equal(r["sizes"][part], ref.sizes[part])  # type: ignore[attr-defined]


def test_a_rollout_with_no_update_keeps_one_version_and_its_tokens(tiny_model_dir: Path) -> None:
    async def run() -> list[list[RolloutChunk]]:
        eng = TorchEngine(tiny_model_dir, max_batch=8, threads=1, flush_every=4)
        await eng.start()
        try:
            out = []
            for i in range(2):
                out.append([c async for c in eng.generate(f"r{i}", PROMPT, params(9))])
            return out
        finally:
            await eng.shutdown()

    a, b = asyncio.run(run())
    ja, jb = joined(a), joined(b)
    assert np.array_equal(ja["tokens"], jb["tokens"])  # seeded: reproduces
    assert set(ja["pv"]) == {0} and set(ja["kv"]) == {0}


@pytest.mark.slow
def test_keep_over_http_spans_versions_and_admits_meanwhile(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("async-root")
    save_file(perturbed(tiny_model_dir, 3), str(root / "p.safetensors"))
    flags = ["--weights-root", str(root), "--weights-update-policy", "keep"]
    flags += ["--max-tokens-cap", "480"]
    with own_server(tiny_model_dir, tmp_path_factory.mktemp("async-srv"), *flags) as server:
        base = server.base_url
        body = {
            "prompts": [PROMPT, [9, 10, 11]],
            "n": 2,
            "sampling": {"max_tokens": 480, "seed": 1, "ignore_eos": True},
            "pruning": {"min_p": 0.02},
        }
        out: dict[str, httpx.Response] = {}
        t = threading.Thread(
            target=lambda: out.setdefault(
                "r", httpx.post(f"{base}/v1/rollouts", json=body, timeout=300)
            )
        )
        t.start()
        time.sleep(0.3)  # the rollouts are decoding
        upd = httpx.post(f"{base}/v1/weights", json={"path": "p.safetensors"}, timeout=300)
        short = httpx.post(
            f"{base}/v1/rollouts",
            json={"prompts": [[5, 6]], "sampling": {"max_tokens": 4, "seed": 2}},
            timeout=300,
        )
        t.join()
        assert upd.status_code == 200, upd.text
        w = upd.json()
        assert w["drained_rollouts"] == 0 and w["aborted_rollouts"] == 0
        assert w["kept_rollouts"] == 4 and w["on_inflight"] == "keep"
        assert short.status_code == 200 and short.json()["rollouts"][0]["policy_version"] == 1
        rolls = out["r"].json()["rollouts"]
        for ro in rolls:
            assert len(ro["token_ids"]) == 480 and ro["finish_reason"] == "length"
            spans = ro["version_spans"]
            assert [s[1] for s in spans] == [0, 1], spans  # both versions, in order
            assert all(s[2] == 0 for s in spans)  # keep: the prefill's KV throughout
            assert ro["policy_version"] == 0
        assert out["r"].json()["policy_version"] == 1
