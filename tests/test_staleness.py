"""Stale tokens (async RL): staleness metrics against a per-token loop, and policy_loss's
max_staleness against a float64 reference written token by token (loss and gradients)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _dvp_batches import engine_response
from _dvp_reference import correction
from dvp_client.train.losses import (
    Aggregation,
    Correction,
    PolicyLossConfig,
    PolicyLossOutput,
    policy_loss,
)
from dvp_client.train.metrics import batch_metrics
from dvp_client.train.objective import pruned_logprobs
from dvp_client.train.staleness import staleness_metrics

MODES = [c.value for c in Correction]
AGGS = [a.value for a in Aggregation]
SEEDS = [0, 1, 2, 3]
LOSS_SEEDS = SEEDS[:3]  # the loss grids are seeds x modes x aggregations (x bounds)
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


# --- policy_loss ----------------------------------------------------------------------


def ref_loss(
    logp: torch.Tensor, d: dict[str, torch.Tensor], mode: str, agg: str, s: int | None
) -> tuple[torch.Tensor, int]:
    """The clipped surrogate with the staleness cut, token by token in float64 scalars
    (differentiable through ``logp``), and the number of tokens dropped for staleness.
    The correction sees every masked token (its weights come from the numpy reference);
    the cut only removes tokens from what is kept."""
    n = {k: v.numpy() for k, v in d.items() if k != "logp"}
    w, keep_corr = correction(
        np.where(n["mask"], n["old"] - n["eng"], 0.0),
        n["mask"],
        mode,
        CFG["cap"],
        (CFG["icepop_low"], CFG["icepop_high"]),
    )
    b, t = logp.shape
    per: dict[tuple[int, int], torch.Tensor] = {}
    dropped = 0
    for i in range(b):
        for j in range(t):
            if not n["mask"][i, j]:
                continue
            stale = s is not None and behind_loop(d, i, j, use_kv=True) > s
            dropped += stale
            if stale or not keep_corr[i, j]:
                continue
            r = torch.exp(logp[i, j] - float(n["old"][i, j]))
            a = float(n["adv"][i])
            clipped = r.clamp(1 - CFG["eps_low"], 1 + CFG["eps_high"])
            per[i, j] = -float(w[i, j]) * torch.minimum(r * a, clipped * a)
    zero = logp.sum() * 0.0
    if not per:
        return zero, dropped
    if agg == "token-mean":
        return sum(per.values(), zero) / len(per), dropped
    rows = sorted({i for i, _ in per})
    sums = [sum((v for (i, _), v in per.items() if i == r), zero) for r in rows]
    if agg == "seq-mean-token-mean":
        sums = [x / sum(1 for i, _ in per if i == r) for x, r in zip(sums, rows, strict=True)]
    return sum(sums, zero) / len(rows), dropped


def run(
    logp: torch.Tensor, d: dict[str, torch.Tensor], mode: str, agg: str, s: int | None, **kw: object
) -> PolicyLossOutput:
    cfg = PolicyLossConfig(correction=mode, aggregation=agg, max_staleness=s, **CFG)  # type: ignore[arg-type]
    args = {
        "token_policy_versions": d["pv"],
        "token_kv_versions": d["kv"],
        "trainer_version": V_TRAINER,
    }
    args.update(kw)
    return policy_loss(
        logp,
        d["adv"],
        d["mask"],
        old_logprobs=d["old"],
        engine_logprobs=d["eng"],
        config=cfg,
        **args,  # type: ignore[arg-type]
    )


def model(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, V]`` -> log-probs of ``y`` ``[B, T]`` (float64, the trainer's head)."""
    return torch.log_softmax(z, -1).gather(-1, y[..., None]).squeeze(-1)


def logits_for(d: dict[str, torch.Tensor], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    b, t = d["mask"].shape
    z = torch.randn(b, t, 11, generator=g, dtype=torch.float64)
    y = torch.randint(0, 11, (b, t), generator=g)
    d["logp"] = model(z, y).detach()
    d["old"] = d["logp"] + 0.1 * torch.randn(b, t, generator=g, dtype=torch.float64)
    return z, y


@pytest.mark.parametrize("seed", LOSS_SEEDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("s", [0, 1, 2])
def test_loss_and_gradient_match_the_token_by_token_reference(
    seed: int, mode: str, agg: str, s: int
) -> None:
    """Gradients are taken at the logits: the dropped tokens' logits get exactly 0."""
    d = batch(seed)
    z, y = logits_for(d, seed)
    za = z.clone().requires_grad_(True)
    out = run(model(za, y), d, mode, agg, s)
    out.loss.backward()
    zb = z.clone().requires_grad_(True)
    want, dropped = ref_loss(model(zb, y), d, mode, agg, s)
    want.backward()
    assert za.grad is not None and zb.grad is not None
    assert abs(float(out.loss.detach()) - float(want.detach())) < 1e-12
    torch.testing.assert_close(za.grad, zb.grad, atol=1e-12, rtol=0)
    assert out.metrics()["policy/stale_dropped"] == float(dropped)
    assert torch.equal(out.stale.sum(), torch.tensor(dropped))
    assert torch.all(za.grad[out.stale] == 0.0)
    assert not bool(out.keep[out.stale].any())
    assert dropped < int(d["mask"].sum()) and (dropped > 0 or s > 0)  # the cut cuts at 0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["none", "token-tis", "token-mis", "icepop"])
@pytest.mark.parametrize("agg", AGGS)
def test_dropping_equals_training_on_the_kept_tokens_alone(seed: int, mode: str, agg: str) -> None:
    """With a per-token correction, the cut is the loss over the remaining tokens
    computed separately (mask = mask minus the stale tokens, no versions)."""
    d = batch(seed)
    z, y = logits_for(d, seed)
    za = z.clone().requires_grad_(True)
    out = run(model(za, y), d, mode, agg, 1)
    out.loss.backward()
    zb = z.clone().requires_grad_(True)
    cfg = PolicyLossConfig(correction=mode, aggregation=agg, **CFG)  # type: ignore[arg-type]
    alone = policy_loss(
        model(zb, y), d["adv"], d["mask"] & ~out.stale, old_logprobs=d["old"],
        engine_logprobs=d["eng"], config=cfg,
    )  # fmt: skip
    alone.loss.backward()
    assert za.grad is not None and zb.grad is not None
    assert float(out.loss.detach()) == pytest.approx(float(alone.loss.detach()), abs=1e-14)
    torch.testing.assert_close(za.grad, zb.grad, atol=1e-14, rtol=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("agg", AGGS)
def test_without_max_staleness_the_loss_is_unchanged_bit_for_bit(
    seed: int, mode: str, agg: str
) -> None:
    """No cut (None, or a bound no token exceeds): the same bits as a call without versions."""
    d = batch(seed)
    cfg = PolicyLossConfig(correction=mode, aggregation=agg, **CFG)  # type: ignore[arg-type]
    outs, grads = [], []
    for kind in ("plain", "none", "loose"):
        x = d["logp"].clone().requires_grad_(True)
        if kind == "plain":
            out = policy_loss(
                x, d["adv"], d["mask"], old_logprobs=d["old"], engine_logprobs=d["eng"], config=cfg
            )
        else:
            out = run(x, d, mode, agg, None if kind == "none" else 4)
        out.loss.backward()
        outs.append(out)
        grads.append(x.grad)
    for out, g in zip(outs[1:], grads[1:], strict=True):
        assert torch.equal(out.loss, outs[0].loss) and torch.equal(out.per_token, outs[0].per_token)
        assert torch.equal(out.keep, outs[0].keep) and torch.equal(g, grads[0])  # type: ignore[arg-type]
        assert out.metrics() == outs[0].metrics()
        assert out.metrics()["policy/stale_dropped"] == 0.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("agg", AGGS)
def test_all_tokens_stale_gives_zero_loss_and_no_nan(mode: str, agg: str) -> None:
    d = batch(8)
    d["pv"][:] = V_TRAINER - 2
    d["kv"][:] = V_TRAINER - 2
    x = d["logp"].clone().requires_grad_(True)
    out = run(x, d, mode, agg, 1)
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and x.grad is not None
    assert torch.all(x.grad == 0.0) and torch.isfinite(out.per_token).all()
    m = out.metrics()
    assert (
        m["policy/stale_dropped"] == float(d["mask"].sum())
        and m["policy/stale_dropped_frac"] == 1.0
    )
    assert all(math.isfinite(v) for v in m.values())


def test_max_staleness_zero_and_versions_equal_everywhere() -> None:
    d = batch(9)
    cfg_plain = PolicyLossConfig(correction="token-tis", **CFG)  # type: ignore[arg-type]
    plain = policy_loss(
        d["logp"],
        d["adv"],
        d["mask"],
        old_logprobs=d["old"],
        engine_logprobs=d["eng"],
        config=cfg_plain,
    )
    d["pv"][:] = V_TRAINER
    d["kv"][:] = V_TRAINER
    same = run(d["logp"], d, "token-tis", "token-mean", 0)  # all current: nothing dropped
    assert torch.equal(same.loss, plain.loss) and not bool(same.stale.any())
    ahead = run(d["logp"], d, "token-tis", "token-mean", 0, trainer_version=V_TRAINER + 1)
    assert bool(torch.equal(ahead.stale, d["mask"])) and float(ahead.loss) == 0.0
    d["kv"][2, 1] = V_TRAINER - 1  # current policy over KV one version old: dropped at s = 0
    one = run(d["logp"], d, "token-tis", "token-mean", 0)
    assert one.stale.nonzero().tolist() == [[2, 1]]
    by_policy = run(d["logp"], d, "token-tis", "token-mean", 0, token_kv_versions=None)
    assert not bool(by_policy.stale.any())  # without kv versions only the policy counts


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "max_staleness must be >= 0, got -1"),
        (1.5, "max_staleness must be an int or None, got 1.5"),
        (True, "max_staleness must be an int or None, got True"),
    ],
)
def test_max_staleness_is_validated_with_the_value(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PolicyLossConfig(max_staleness=value)  # type: ignore[arg-type]


def test_policy_loss_bad_versions() -> None:
    d = batch(10)
    cfg = PolicyLossConfig(max_staleness=2)
    with pytest.raises(
        ValueError, match="max_staleness=2 needs token_policy_versions and trainer_version"
    ):
        policy_loss(d["logp"], d["adv"], d["mask"], config=cfg)
    with pytest.raises(ValueError, match="token_policy_versions needs trainer_version, got None"):
        policy_loss(d["logp"], d["adv"], d["mask"], config=cfg, token_policy_versions=d["pv"])
    future = d["pv"].clone()
    future[1, 2] = V_TRAINER + 3
    for s in (None, 2):  # checked with or without the cut
        with pytest.raises(ValueError, match=r"got 10 at batch 1, step 2"):
            run(d["logp"], d, "none", "token-mean", s, token_policy_versions=future)
    with pytest.raises(ValueError, match=r"token_policy_versions must be \[6, 7\] like mask"):
        run(d["logp"], d, "none", "token-mean", 1, token_policy_versions=d["pv"][:2])
