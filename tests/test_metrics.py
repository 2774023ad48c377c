"""Mismatch metrics against a float64 numpy reference, on random and planted data."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from _dvp_batches import engine_response
from dvp_client.train.metrics import (
    DEFAULT_PROB_BINS,
    DEFAULT_QUANTILES,
    batch_metrics,
    mismatch_metrics,
)
from dvp_client.train.objective import pruned_logprobs


def data(seed: int, b: int = 5, t: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    eng_full = -torch.rand(b, t, generator=g, dtype=torch.float64) * 6
    tr_full = eng_full + 0.05 * torch.randn(b, t, generator=g, dtype=torch.float64)
    eng_lz = -torch.rand(b, t, generator=g, dtype=torch.float64) * 0.1
    tr_lz = eng_lz + 0.01 * torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 5:] = False
    dropped = torch.zeros(b, t, dtype=torch.bool)
    dropped[3, 1] = dropped[4, 7] = True
    eng_full[1, 2] = math.nan  # the engine gave null there
    return {
        "mask": mask,
        "engine_masked": (eng_full - eng_lz).nan_to_num(-1.0),
        "trainer_masked": tr_full - tr_lz,
        "engine_full": eng_full,
        "trainer_full": tr_full,
        "engine_logmass": eng_lz,
        "trainer_logmass": tr_lz,
        "safe_sizes": torch.randint(1, 50, (b, t), generator=g),
        "set_disagreement": torch.randint(0, 3, (b, t), generator=g),
        "dropped": dropped,
    }


def call(d: dict[str, torch.Tensor]) -> dict[str, float]:
    kw = {k: v for k, v in d.items() if k not in ("mask", "engine_masked", "trainer_masked")}
    return mismatch_metrics(d["mask"], d["engine_masked"], d["trainer_masked"], **kw)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_numpy_reference(seed: int) -> None:
    d = data(seed)
    got = call(d)
    n = {k: v.numpy() for k, v in d.items()}
    steps = n["mask"] & ~n["dropped"]
    dp = (n["trainer_masked"] - n["engine_masked"])[steps]
    sel_f = n["mask"] & np.isfinite(n["engine_full"])
    df = (n["trainer_full"] - n["engine_full"])[sel_f]
    want = {
        "mismatch/tokens": steps.sum(),
        "mismatch/k1_pruned": np.mean(-dp),
        "mismatch/k3_pruned": np.mean(np.exp(dp) - 1 - dp),
        "mismatch/abs_dlogp_mean_pruned": np.mean(np.abs(dp)),
        "mismatch/abs_dlogp_max_pruned": np.max(np.abs(dp)),
        "mismatch/k1_full": np.mean(-df),
        "mismatch/k3_full": np.mean(np.exp(df) - 1 - df),
        "mismatch/abs_dlogp_mean_full": np.mean(np.abs(df)),
        "mismatch/abs_dlogp_max_full": np.max(np.abs(df)),
        "dvp/frac_masked": 2 / n["mask"].sum(),
        "dvp/safe_size_mean": n["safe_sizes"][n["mask"]].mean(),
        "dvp/pruned_mass_engine": np.mean(1 - np.exp(n["engine_logmass"][n["mask"]])),
        "dvp/pruned_mass_trainer": np.mean(1 - np.exp(n["trainer_logmass"][steps])),
        "dvp/set_disagreement_rate": np.mean(n["set_disagreement"][n["mask"]] > 0),
        "dvp/set_xor_mean": np.mean(n["set_disagreement"][n["mask"]]),
        "is_weight/mean": np.mean(np.exp(dp)),
    }
    for q in DEFAULT_QUANTILES:
        want[f"is_weight/q{q:g}"] = np.quantile(np.exp(dp), q)
    prob = np.exp(n["trainer_masked"][steps])
    edges = DEFAULT_PROB_BINS
    for k in range(len(edges) - 1):
        lo, hi = edges[k], edges[k + 1]
        sel = (prob >= lo) & ((prob <= hi) if k == len(edges) - 2 else (prob < hi))
        want[f"mismatch/count_bin_{lo:g}_{hi:g}"] = sel.sum()
        want[f"mismatch/abs_dlogp_bin_{lo:g}_{hi:g}"] = (
            np.abs(dp[sel]).mean() if sel.any() else math.nan
        )
    assert set(got) == set(want)
    for k, v in want.items():
        assert isinstance(got[k], float), k
        if math.isnan(v):
            assert math.isnan(got[k]), k
        else:
            assert got[k] == pytest.approx(float(v), rel=1e-9, abs=1e-12), k
    assert (
        sum(got[f"mismatch/count_bin_{a:g}_{b:g}"] for a, b in itertools.pairwise(edges))
        == steps.sum()
    )


def test_no_mismatch_gives_zero_kl_and_unit_weights() -> None:
    d = data(3)
    d["trainer_masked"] = d["engine_masked"].clone()
    d["engine_full"] = d["trainer_full"].clone()
    got = call(d)
    for k in (
        "k1_pruned",
        "k3_pruned",
        "k1_full",
        "k3_full",
        "abs_dlogp_max_pruned",
        "abs_dlogp_max_full",
    ):
        assert got[f"mismatch/{k}"] == 0.0, k
    assert got["is_weight/q0"] == got["is_weight/q1"] == 1.0


def test_k3_is_nonnegative_and_tracks_a_planted_mismatch() -> None:
    d = data(4)
    base = call(d)
    d["trainer_masked"][2, 3] += 2.0  # one badly scored token
    got = call(d)
    assert got["mismatch/k3_pruned"] > base["mismatch/k3_pruned"] >= 0
    assert got["mismatch/abs_dlogp_max_pruned"] >= 2.0 - 0.5
    assert got["is_weight/q1"] > math.exp(1.5)


def test_missing_inputs_and_empty_masks() -> None:
    d = data(5)
    got = mismatch_metrics(d["mask"], d["engine_masked"], d["trainer_masked"])
    assert "mismatch/k1_full" not in got and "dvp/set_xor_mean" not in got
    assert got["dvp/frac_masked"] == 0.0
    d["engine_full"][:] = math.nan
    assert math.isnan(call(d)["mismatch/k1_full"])
    d["mask"][:] = False
    got = call(d)
    assert got["mismatch/tokens"] == 0.0 and math.isnan(got["mismatch/k1_pruned"])
    assert math.isnan(got["is_weight/q0.5"])


def test_bad_input() -> None:
    d = data(6)
    with pytest.raises(
        ValueError, match=r"trainer_masked must be \[5, 8\] like mask, got \[5, 7\]"
    ):
        mismatch_metrics(d["mask"], d["engine_masked"], d["trainer_masked"][:, :7])
    with pytest.raises(ValueError, match="prob_bins must be increasing"):
        mismatch_metrics(d["mask"], d["engine_masked"], d["trainer_masked"], prob_bins=(0.5, 0.1))
    with pytest.raises(ValueError, match=r"quantiles must be in \[0, 1\]"):
        mismatch_metrics(d["mask"], d["engine_masked"], d["trainer_masked"], quantiles=(1.5,))


def test_batch_metrics_from_a_rollout_batch() -> None:
    """Trainer logits = engine logits + noise: replay mismatch > 0, no masked steps."""
    batch, logits = engine_response(7, [2, 3], [5, 4])
    bt = batch.to_torch()
    z = torch.zeros(2, 5, 40)
    for i, x in enumerate(logits):
        z[i, : len(x)] = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
    res = pruned_logprobs(z, bt.tokens, bt.safe, mask=bt.loss_mask)
    got = batch_metrics(bt, res)
    assert got["mismatch/tokens"] == 9.0 and got["dvp/frac_masked"] == 0.0
    assert got["mismatch/k3_pruned"] > 0 and got["mismatch/k3_full"] > 0
    sizes = [s for r in batch.rollouts for s in r.safe_sizes]
    assert got["dvp/safe_size_mean"] == pytest.approx(np.mean(sizes))
    res = pruned_logprobs(z, bt.tokens, bt.safe, mask=bt.loss_mask, mode="recompute")
    got = batch_metrics(bt, res)
    assert "dvp/set_disagreement_rate" in got and 0 <= got["dvp/frac_masked"] <= 1
