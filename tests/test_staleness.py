"""Stale tokens (async RL): staleness metrics against a per-token loop, and policy_loss's
max_staleness against a float64 reference written token by token (loss and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
from _dvp_batches import engine_response
from dvp_client.train.metrics import batch_metrics
from dvp_client.train.objective import pruned_logprobs
from dvp_client.train.staleness import staleness_metrics

SEEDS = [0, 1, 2, 3]
V_TRAINER = 7  # the trainer's version in the random batches
CFG = {"eps_low": 0.2, "eps_high": 0.28, "cap": 1.5, "icepop_low": 0.8, "icepop_high": 1.25}


def versions(
    g: torch.Generator, mask: torch.Tensor, trainer: int = V_TRAINER
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (policy, kv) versions as a server reports them: each row starts 0-4
    versions behind and moves up at random steps; rows alternate between keep (kv = the
    version of the prefill) and recompute (kv = the policy version); padding holds the
    row's last version, except row 0 whose padding holds a future version (the mask must
    keep it out of every check)."""
    b, t = mask.shape
    start = trainer - torch.randint(0, 5, (b, 1), generator=g)
    bumps = (torch.rand(b, t, generator=g) < 0.3).long().cumsum(-1)
    policy = (start + bumps).clamp(max=trainer)
    kv = torch.where(torch.arange(b)[:, None] % 2 == 0, start.expand(b, t), policy)
    last = torch.where(mask.any(-1), (mask.long().cumsum(-1) * mask).argmax(-1), 0)  # (B,)
    policy = torch.where(mask, policy, policy.gather(1, last[:, None]))
    kv = torch.where(mask, kv, kv.gather(1, last[:, None]))
    policy[0][~mask[0]] = trainer + 5
    kv[0][~mask[0]] = trainer + 5
    return policy, kv


def batch(seed: int, b: int = 6, t: int = 7, spread: float = 0.3) -> dict[str, torch.Tensor]:
    """float64 log-probs (trainer / old / engine ~spread apart), a short row, an empty row,
    per-rollout advantages, versions."""
    g = torch.Generator().manual_seed(seed)
    eng = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = eng + spread * torch.randn(b, t, generator=g, dtype=torch.float64)
    logp = old + spread * torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 4:] = False
    mask[3] = False
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    policy, kv = versions(g, mask)
    return {"logp": logp, "old": old, "eng": eng, "adv": adv, "mask": mask, "pv": policy, "kv": kv}


def behind_loop(d: dict[str, torch.Tensor], i: int, j: int, use_kv: bool) -> int:
    v = int(d["pv"][i, j])
    return V_TRAINER - (min(v, int(d["kv"][i, j])) if use_kv else v)


# --- metrics ------------------------------------------------------------------------


def metrics_loop(d: dict[str, torch.Tensor], use_kv: bool) -> dict[str, float]:
    """The staleness keys, one token at a time in Python floats."""
    behinds, kv_older = [], []
    buckets: dict[str, list[float]] = {"0": [], "1": [], "2": [], "3plus": []}
    b, t = d["mask"].shape
    for i in range(b):
        for j in range(t):
            if not d["mask"][i, j]:
                continue
            k = behind_loop(d, i, j, use_kv)
            behinds.append(k)
            kv_older.append(use_kv and int(d["kv"][i, j]) < int(d["pv"][i, j]))
            buckets["3plus" if k >= 3 else str(k)].append(float(d["logp"][i, j] - d["eng"][i, j]))
    n = len(behinds)
    out = {
        "staleness/tokens": float(n),
        "staleness/behind_mean": sum(behinds) / n if n else math.nan,
        "staleness/behind_max": float(max(behinds)) if n else math.nan,
        "staleness/frac_stale": sum(k > 0 for k in behinds) / n if n else math.nan,
        "staleness/frac_kv_older": sum(kv_older) / n if n else math.nan,
    }
    for name, ds in buckets.items():
        out[f"staleness/count_behind_{name}"] = float(len(ds))
        k3 = [math.exp(x) - 1 - x for x in ds]
        out[f"staleness/k3_behind_{name}"] = sum(k3) / len(ds) if ds else math.nan
        out[f"staleness/abs_dlogp_behind_{name}"] = sum(map(abs, ds)) / len(ds) if ds else math.nan
    return out


def assert_same(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert isinstance(got[k], float), k
        if math.isnan(v):
            assert math.isnan(got[k]), k
        else:
            assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-14), k


def call_metrics(d: dict[str, torch.Tensor], use_kv: bool) -> dict[str, float]:
    kv = d["kv"] if use_kv else None
    return staleness_metrics(d["mask"], d["eng"], d["logp"], d["pv"], V_TRAINER, kv)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("use_kv", [True, False])
def test_staleness_metrics_match_a_per_token_loop(seed: int, use_kv: bool) -> None:
    d = batch(seed)
    got = call_metrics(d, use_kv)
    assert_same(got, metrics_loop(d, use_kv))
    counts = sum(got[f"staleness/count_behind_{k}"] for k in ("0", "1", "2", "3plus"))
    assert counts == got["staleness/tokens"] == float(d["mask"].sum())


def test_staleness_metrics_buckets_are_all_filled_somewhere() -> None:
    """The random batches reach every bucket and keep-mode KV (or the loop test is weak)."""
    seen = {k: 0.0 for k in ("0", "1", "2", "3plus")}
    frac_kv = 0.0
    for seed in SEEDS:
        got = call_metrics(batch(seed), use_kv=True)
        frac_kv += got["staleness/frac_kv_older"]
        for k in seen:
            seen[k] += got[f"staleness/count_behind_{k}"]
    assert all(v > 0 for v in seen.values()) and frac_kv > 0


def test_staleness_metrics_planted_kv() -> None:
    """A token sampled by the trainer's version over KV three versions old is 3 behind."""
    d = batch(4)
    d["pv"][:] = V_TRAINER
    d["kv"][:] = V_TRAINER
    d["kv"][1, 5] = V_TRAINER - 3
    got = call_metrics(d, use_kv=True)
    n = float(d["mask"].sum())
    assert got["staleness/count_behind_3plus"] == 1.0 and got["staleness/behind_max"] == 3.0
    assert got["staleness/frac_stale"] == got["staleness/frac_kv_older"] == pytest.approx(1 / n)
    dd = float(d["logp"][1, 5] - d["eng"][1, 5])
    assert got["staleness/abs_dlogp_behind_3plus"] == pytest.approx(abs(dd), rel=1e-12)
    no_kv = call_metrics(d, use_kv=False)  # by policy version only: nothing stale
    assert no_kv["staleness/behind_max"] == 0.0 and no_kv["staleness/frac_stale"] == 0.0


def test_staleness_metrics_versions_equal_and_empty_mask() -> None:
    d = batch(5)
    d["pv"][:] = V_TRAINER
    d["kv"][:] = V_TRAINER
    got = call_metrics(d, use_kv=True)
    assert got["staleness/behind_mean"] == got["staleness/behind_max"] == 0.0
    assert got["staleness/frac_stale"] == got["staleness/frac_kv_older"] == 0.0
    assert got["staleness/count_behind_0"] == float(d["mask"].sum())
    for k in ("1", "2", "3plus"):
        assert got[f"staleness/count_behind_{k}"] == 0.0
        assert math.isnan(got[f"staleness/k3_behind_{k}"])
    d["mask"][:] = False
    got = call_metrics(d, use_kv=True)
    assert got["staleness/tokens"] == 0.0 and math.isnan(got["staleness/behind_max"])
    assert math.isnan(got["staleness/frac_stale"]) and math.isnan(got["staleness/k3_behind_0"])


def test_staleness_metrics_bad_input() -> None:
    d = batch(6)
    m, e, lp = d["mask"], d["eng"], d["logp"]
    future = d["pv"].clone()
    future[2, 3] = V_TRAINER + 1
    with pytest.raises(
        ValueError,
        match=r"token_policy_versions must be <= trainer_version 7, got 8 at batch 2, step 3",
    ):
        staleness_metrics(m, e, lp, future, V_TRAINER)
    kv = d["pv"].clone()
    kv[4, 1] = int(d["pv"][4, 1]) + 1
    with pytest.raises(
        ValueError, match=r"token_kv_versions must be <= token_policy_versions.*batch 4, step 1"
    ):
        staleness_metrics(m, e, lp, d["pv"], V_TRAINER, kv)
    with pytest.raises(
        ValueError, match=r"token_policy_versions must be an integer tensor, got torch\.float64"
    ):
        staleness_metrics(m, e, lp, d["pv"].double(), V_TRAINER)
    with pytest.raises(
        ValueError, match=r"token_kv_versions must be \[6, 7\] like mask, got \[6, 6\]"
    ):
        staleness_metrics(m, e, lp, d["pv"], V_TRAINER, d["kv"][:, :6])
    with pytest.raises(ValueError, match=r"trainer_version must be an int, got 7\.0"):
        staleness_metrics(m, e, lp, d["pv"], 7.0)  # type: ignore[arg-type]


def test_batch_metrics_adds_staleness_only_when_given_versions() -> None:
    batch_, logits = engine_response(7, [2, 3, 1], [5, 4, 6])
    bt = batch_.to_torch()
    z = torch.zeros(3, 6, 40)
    for i, x in enumerate(logits):
        z[i, : len(x)] = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
    res = pruned_logprobs(z, bt.tokens, bt.safe, mask=bt.loss_mask)
    pv = torch.tensor([[3, 3, 4, 4, 4, 4], [2, 2, 2, 2, 2, 2], [4, 4, 4, 5, 5, 5]])
    kv = torch.tensor([[3, 3, 3, 3, 3, 3], [2, 2, 2, 2, 2, 2], [4, 4, 4, 5, 5, 5]])
    plain = batch_metrics(bt, res)
    got = batch_metrics(bt, res, token_policy_versions=pv, token_kv_versions=kv, trainer_version=5)
    assert not any(k.startswith("staleness/") for k in plain)
    assert {k: v for k, v in got.items() if k in plain} == pytest.approx(plain, nan_ok=True)
    want = staleness_metrics(bt.loss_mask, bt.engine_masked_logprobs, res.logprobs, pv, 5, kv)
    assert_same({k: v for k, v in got.items() if k.startswith("staleness/")}, want)
    # rollout 0: 5 tokens 2 behind (kv 3); rollout 1: 4 tokens 3 behind; rollout 2: 3 + 3
    assert got["staleness/count_behind_2"] == 5.0 and got["staleness/count_behind_3plus"] == 4.0
    assert got["staleness/count_behind_0"] == 3.0 and got["staleness/count_behind_1"] == 3.0
    assert got["staleness/frac_kv_older"] == pytest.approx(3 / 15)
    with pytest.raises(ValueError, match="token_policy_versions needs trainer_version"):
        batch_metrics(bt, res, token_policy_versions=pv)
    with pytest.raises(ValueError, match="trainer_version=5 needs token_policy_versions"):
        batch_metrics(bt, res, trainer_version=5)
    with pytest.raises(ValueError, match="token_kv_versions needs token_policy_versions"):
        batch_metrics(bt, res, token_kv_versions=kv)
