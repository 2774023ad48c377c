"""policy_loss and group_advantages against float64 numpy references; what each
correction changes (and what it leaves alone); DVP removing a tail token's weight."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _dvp_reference import group_advantages as ref_group_advantages
from _dvp_reference import ppo_loss
from dvp_client.train.advantages import group_advantages
from dvp_client.train.losses import Aggregation, Correction, PolicyLossConfig, policy_loss
from dvp_client.train.objective import pruned_logprobs
from dvp_client.train.rule import safe_mask
from dvp_client.train.tensors import SafeSets

MODES = [c.value for c in Correction]
AGGS = [a.value for a in Aggregation]
SEEDS = [0, 1, 2]


def batch(seed: int, b: int = 4, t: int = 6, spread: float = 0.3) -> dict[str, torch.Tensor]:
    """float64 log-probs with trainer/old/engine differences of size ~spread; one rollout
    shorter, one empty, per-rollout advantages."""
    g = torch.Generator().manual_seed(seed)
    eng = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = eng + spread * torch.randn(b, t, generator=g, dtype=torch.float64)
    logp = old + spread * torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2] = False
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    return {"logp": logp, "old": old, "eng": eng, "adv": adv, "mask": mask}


def run(d: dict[str, torch.Tensor], **cfg: object) -> torch.Tensor:
    out = policy_loss(
        d["logp"],
        d["adv"],
        d["mask"],
        old_logprobs=d["old"],
        engine_logprobs=d["eng"],
        config=PolicyLossConfig(**cfg),  # type: ignore[arg-type]
    )
    return out.loss


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("agg", AGGS)
def test_loss_matches_float64_reference(seed: int, mode: str, agg: str) -> None:
    d = batch(seed)
    cfg = {"eps_low": 0.2, "eps_high": 0.28, "cap": 1.5, "icepop_low": 0.8, "icepop_high": 1.25}
    got = run(d, correction=mode, aggregation=agg, **cfg)
    n = {k: v.numpy() for k, v in d.items()}
    want = ppo_loss(
        n["logp"], n["old"], n["eng"], n["adv"], n["mask"], mode=mode, agg=agg,
        eps_low=0.2, eps_high=0.28, cap=1.5, band=(0.8, 1.25),
    )  # fmt: skip
    assert got.dtype == torch.float64
    assert abs(float(got) - want) < 1e-12


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("agg", AGGS)
def test_gradient_matches_finite_differences(mode: str, agg: str) -> None:
    d = batch(3, spread=0.1)
    adv_tok = torch.randn(
        d["logp"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9)
    )

    def f(logp: torch.Tensor) -> torch.Tensor:
        cfg = PolicyLossConfig(correction=mode, aggregation=agg, eps_low=0.1, eps_high=0.15)  # type: ignore[arg-type]
        return policy_loss(
            logp, adv_tok, d["mask"], old_logprobs=d["old"], engine_logprobs=d["eng"], config=cfg
        ).loss

    assert torch.autograd.gradcheck(f, (d["logp"].clone().requires_grad_(True),), eps=1e-7)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", MODES)
def test_without_mismatch_every_correction_is_plain_ppo(seed: int, mode: str) -> None:
    d = batch(seed)
    d["eng"] = d["old"].clone()  # engine == trainer: rho = 1 everywhere
    x = d["logp"].clone().requires_grad_(True)
    y = d["logp"].clone().requires_grad_(True)
    cfg = PolicyLossConfig(correction=mode, cap=1.0, icepop_low=1.0, icepop_high=1.0)  # tightest  # type: ignore[arg-type]
    a = policy_loss(
        x, d["adv"], d["mask"], old_logprobs=d["old"], engine_logprobs=d["eng"], config=cfg
    )
    b = policy_loss(y, d["adv"], d["mask"], old_logprobs=d["old"])
    a.loss.backward()
    b.loss.backward()
    assert float(a.loss.detach()) == pytest.approx(float(b.loss.detach()), abs=1e-12)
    torch.testing.assert_close(x.grad, y.grad, atol=1e-12, rtol=0)
    assert torch.equal(a.keep, d["mask"])


@pytest.mark.parametrize("mode", MODES)
def test_planted_mismatch_token_is_handled_and_nothing_else_changes(mode: str) -> None:
    """Token (0, 2): the engine gave it 10x less probability than the trainer (rho = 10)."""
    d = batch(4, spread=0.0)  # rho = 1 and ratio = 1 everywhere else
    d["eng"][0, 2] -= math.log(10.0)
    cfg = PolicyLossConfig(correction=mode, aggregation="token-mean", cap=2.0)  # type: ignore[arg-type]
    base = policy_loss(d["logp"], d["adv"], d["mask"], old_logprobs=d["old"])
    out = policy_loss(
        d["logp"], d["adv"], d["mask"], old_logprobs=d["old"], engine_logprobs=d["eng"], config=cfg
    )
    w, keep = out.weights, out.keep
    others = d["mask"].clone()
    others[0] = False if mode.startswith("seq") else others[0]
    others[0, 2] = False
    assert torch.all(w[others] == 1.0) and torch.all(keep[others])  # untouched
    torch.testing.assert_close(out.per_token[others], base.per_token[others])
    expect = {
        "none": (1.0, True, 1.0),  # (weight of (0, 2), kept, weight of row 0's other tokens)
        "token-tis": (2.0, True, 1.0),
        "seq-tis": (2.0, True, 2.0),
        "token-mis": (0.0, False, 1.0),
        "seq-mis": (0.0, False, 0.0),
        "icepop": (0.0, False, 1.0),
    }[mode]
    assert float(w[0, 2]) == pytest.approx(expect[0])
    assert bool(keep[0, 2]) is expect[1]
    assert float(w[0, 0]) == pytest.approx(expect[2])
    assert bool(keep[0, 0]) is (expect[2] > 0)


def test_dvp_removes_a_planted_tail_tokens_weight() -> None:
    """A tail token just outside S whose trainer logit is badly off (+6 nats): with DVP the pruned
    log-prob, ratio and loss do not move and its logit gets exactly zero gradient; the
    full-vocabulary objective moves and pushes on it."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 100, generator=g) * 2
    mask = safe_mask(z, min_p=0.01)
    y = torch.multinomial(mask.float().view(-1, 100), 1, generator=g).view(2, 5)
    tail = int(z[0, 1].masked_fill(mask[0, 1], -math.inf).argmax())  # best pruned token
    eng = pruned_logprobs(z, y, mask, 1.0)  # the engine's own numbers
    z_tr = z.clone()
    z_tr[0, 1, tail] += 6.0
    sets = SafeSets.from_mask(mask, temperature=1.0)
    adv = torch.tensor([1.0, -1.0])
    loss_mask = torch.ones(2, 5, dtype=torch.bool)
    cfg = PolicyLossConfig(correction="token-tis")

    def step(full: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = z_tr.clone().requires_grad_(True)
        r = pruned_logprobs(x, y, sets)
        logp, e = (r.full_logprobs, eng.full_logprobs) if full else (r.logprobs, eng.logprobs)
        out = policy_loss(logp, adv, loss_mask, engine_logprobs=e.detach(), config=cfg)
        out.loss.backward()
        assert x.grad is not None
        return out.loss.detach(), out.weights, x.grad

    _, w_dvp, g_dvp = step(full=False)
    _, w_full, g_full = step(full=True)
    torch.testing.assert_close(w_dvp, torch.ones_like(w_dvp))  # pruned ratio: tail-blind
    assert float(w_full[0, 1]) < 0.8  # full-vocabulary ratio moved at that step
    assert g_dvp[0, 1, tail] == 0.0
    assert g_full[0, 1, tail] != 0.0
    assert torch.all(g_dvp[~mask] == 0.0)  # no token outside S gets any gradient


def test_zero_advantages_and_empty_masks() -> None:
    d = batch(5)
    x = d["logp"].clone().requires_grad_(True)
    out = policy_loss(x, torch.zeros(4, dtype=torch.float64), d["mask"], old_logprobs=d["old"])
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and x.grad is not None and x.grad.abs().max() == 0
    for agg in AGGS:
        x = d["logp"].clone().requires_grad_(True)
        empty = torch.zeros_like(d["mask"])
        cfg = PolicyLossConfig(aggregation=agg)  # type: ignore[arg-type]
        out = policy_loss(x, d["adv"], empty, old_logprobs=d["old"], config=cfg)
        out.loss.backward()
        assert float(out.loss.detach()) == 0.0 and x.grad is not None and torch.all(x.grad == 0)


def test_ratio_exactly_one_is_never_clipped() -> None:
    d = batch(6)
    out = policy_loss(
        d["logp"], d["adv"], d["mask"], config=PolicyLossConfig(eps_low=0.0, eps_high=1e-9)
    )
    assert torch.all(out.ratio[d["mask"]] == 1.0)
    m = out.metrics()
    assert m["policy/clip_frac"] == 0.0 and m["policy/ratio_mean"] == 1.0
    assert m["policy/kept_frac"] == 1.0


def test_metrics_report_clipping_and_rejection() -> None:
    d = batch(7, spread=0.5)
    cfg = PolicyLossConfig(correction="token-mis", cap=1.2, eps_low=0.1, eps_high=0.1)
    out = policy_loss(
        d["logp"], d["adv"], d["mask"], old_logprobs=d["old"], engine_logprobs=d["eng"], config=cfg
    )
    m = out.metrics()
    rho = torch.exp(d["old"] - d["eng"])
    keep = d["mask"] & (rho <= 1.2)
    r = torch.exp(d["logp"] - d["old"])
    a = d["adv"][:, None].expand_as(r)
    clipped = keep & (torch.clamp(r, 0.9, 1.1) * a < r * a)
    assert m["policy/kept_frac"] == pytest.approx(float(keep.sum() / d["mask"].sum()))
    assert m["policy/clip_frac"] == pytest.approx(float(clipped.sum() / keep.sum()))
    assert 0 < m["policy/clip_frac"] < 1 and 0 < m["policy/kept_frac"] < 1
    assert set(m) >= {"policy/loss", "policy/weight_mean", "policy/weight_max"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps_low": -0.1}, r"eps_low must be in \[0, 1\), got -0.1"),
        ({"eps_low": 1.0}, r"eps_low must be in \[0, 1\), got 1.0"),
        ({"eps_high": -0.1}, "eps_high must be positive and finite, got -0.1"),
        ({"cap": 0.5}, "cap must be >= 1 and finite, got 0.5"),
        ({"cap": math.inf}, "cap must be >= 1 and finite, got inf"),
        ({"icepop_low": 1.5}, r"icepop band .* got \[1.5, 5.0\]"),
        ({"icepop_low": 0.0}, r"icepop band .* got \[0.0, 5.0\]"),
        ({"icepop_high": 0.9}, r"icepop band .* got \[0.5, 0.9\]"),
        ({"correction": "tis"}, "correction must be one of 'none', 'token-tis'.*got 'tis'"),
        ({"aggregation": "mean"}, "aggregation must be one of 'token-mean'.*got 'mean'"),
    ],
)
def test_config_is_validated_with_the_value(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PolicyLossConfig(**kwargs)  # type: ignore[arg-type]


def test_config_accepts_strings_and_enums() -> None:
    a = PolicyLossConfig(correction="icepop", aggregation="seq-mean-token-sum")  # type: ignore[arg-type]
    assert a.correction is Correction.ICEPOP and a.aggregation is Aggregation.SEQ_MEAN_TOKEN_SUM


def test_policy_loss_bad_input() -> None:
    d = batch(8)
    with pytest.raises(ValueError, match=r"advantages must be \[4\] or \[4, 6\], got \[3\]"):
        policy_loss(d["logp"], d["adv"][:3], d["mask"])
    with pytest.raises(ValueError, match=r"old_logprobs must be \[4, 6\], got \[4, 5\]"):
        policy_loss(d["logp"], d["adv"], d["mask"], old_logprobs=d["old"][:, :5])
    with pytest.raises(ValueError, match=r"mask must be bool \[4, 6\]"):
        policy_loss(d["logp"], d["adv"], d["mask"].float())
    with pytest.raises(ValueError, match="correction 'token-tis' needs engine_logprobs"):
        policy_loss(d["logp"], d["adv"], d["mask"], config=PolicyLossConfig(correction="token-tis"))  # type: ignore[arg-type]
    eng = d["eng"].clone()
    eng[3, 2] = -math.inf
    with pytest.raises(ValueError, match="engine_logprobs is not finite at batch 3, step 2: -inf"):
        policy_loss(d["logp"], d["adv"], d["mask"], engine_logprobs=eng)
    eng[3, 2] = 0.0
    eng[2, 2] = math.nan  # rollout 2 is masked out: ignored
    policy_loss(d["logp"], d["adv"], d["mask"], engine_logprobs=eng)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_reference(seed: int, scale: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    groups = torch.tensor([7, 7, 7, 7, 3, 3, 9, 12, 12, 12])  # sizes 4, 2, 1, 3; any ids
    groups = groups[torch.randperm(10, generator=g)]
    rewards = torch.randint(0, 3, (10,), generator=g).float()
    got = group_advantages(rewards, groups, scale=scale, eps=1e-6)
    want = ref_group_advantages(rewards.numpy(), groups.numpy(), scale, 1e-6)
    np.testing.assert_allclose(got.double(), want, atol=1e-6)
    assert float(got[groups == 9]) == 0.0  # singleton group
    for gid in (7, 3, 12):
        assert abs(float(got[groups == gid].sum())) < 1e-5  # centred within each group


def test_group_advantages_constant_group_is_zero_and_bad_input() -> None:
    a = group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([0, 0, 1, 1]))
    assert a[:2].abs().max() == 0 and a[2] < 0 < a[3]
    with pytest.raises(ValueError, match=r"group_ids must be \[3\] like rewards, got \[2\]"):
        group_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="group_ids must be an integer tensor"):
        group_advantages(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"rewards\[1\] is not finite: nan"):
        group_advantages(torch.tensor([0.0, math.nan]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="eps must be positive, got 0"):
        group_advantages(torch.zeros(2), torch.tensor([0, 0]), eps=0)


def test_trainer_names_resolve_from_the_package() -> None:
    """``dvp_client.policy_loss`` etc. resolve lazily to the ``dvp_client.train`` modules."""
    import importlib

    import dvp_client

    for name in dvp_client._TORCH_EXPORTS:
        module = importlib.import_module(f"dvp_client.train.{dvp_client._TORCH_EXPORTS[name]}")
        assert getattr(dvp_client, name) is getattr(module, name), name
    assert dvp_client.policy_loss is policy_loss
