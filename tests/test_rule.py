"""The safe-vocabulary rule against a naive float64 numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dvp_client.train.rule import RuleParams, safe_mask, safe_vocab
from scipy import stats

# Tolerances: fp32 log-probs against the float64 reference, relative in norm.
LOGP_RTOL = {torch.float32: 1e-6, torch.bfloat16: 1e-6}
# A token whose rule quantity lies within this of a threshold may fall either side in fp32.
BOUNDARY = 1e-5


def ref_rule(z: np.ndarray, t: float, rho: float, k: int | None, q: float) -> dict[str, np.ndarray]:
    """The rule of docs/protocol.md for one step, in float64, written the slow way."""
    z = z.astype(np.float64)
    u = z if t == 0 else z / t
    lse = np.log(np.sum(np.exp(u - u.max()))) + u.max()
    p = np.exp(u - lse)
    if t == 0:
        keep = np.zeros(len(z), bool)
        keep[int(np.argmax(z))] = True
    else:
        keep = p >= rho * p.max()
        if k:
            kept = np.sort(u[keep])[::-1]
            if k < len(kept):
                keep &= u >= kept[k - 1]
        if q < 1:
            idx = [i for i in np.argsort(-u, kind="stable") if keep[i]]
            mass = p[idx] / p[idx].sum()
            new = np.zeros(len(z), bool)
            before = 0.0
            for i, m in zip(idx, mass, strict=False):
                if before < q or i == idx[0]:
                    new[i] = True
                before += m
            keep = new
    lse_s = np.log(np.sum(np.exp(u[keep] - u[keep].max()))) + u[keep].max()
    return {"u": u, "p": p, "keep": keep, "lse": lse, "lse_s": lse_s, "logmass": lse_s - lse}


def near_boundary(z: np.ndarray, t: float, rho: float, q: float) -> np.ndarray:
    """Tokens whose min-p ratio or top-p prefix mass is within BOUNDARY of its threshold."""
    r = ref_rule(z, t, rho, None, 1.0)
    u, p = r["u"], r["p"]
    near = np.zeros(len(z), bool)
    if rho > 0:
        near |= np.abs((u - u.max()) - math.log(rho)) < BOUNDARY
    if q < 1:
        order = np.argsort(-u)
        before = np.cumsum(p[order]) - p[order]
        near[order] |= np.abs(before / p[r["keep"]].sum() - q) < 1e-3  # renormalised mass
    return near


CASES = [
    # (temperature, min_p, top_k, top_p)
    (1.0, 0.0, None, 1.0),  # nothing pruned
    (1.0, 1e-3, None, 1.0),  # the DVP default
    (0.7, 1e-2, None, 1.0),
    (1.3, 0.1, None, 1.0),
    (1.0, 0.0, 20, 1.0),
    (1.0, 1e-3, 5, 1.0),
    (1.0, 0.0, None, 0.9),
    (0.8, 1e-4, 50, 0.95),
    (0.5, 0.5, 3, 0.5),
    (0.0, 1e-3, None, 1.0),  # greedy
    (1.0, 1.0, None, 1.0),  # only the argmax (and exact ties with it)
    (1.0, 0.0, 1, 1.0),  # one-token set through top-k
    (1.0, 0.0, None, 1e-6),  # one-token set through top-p
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(1, 7), (5, 64), (3, 1000), (2, 49152)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}_rho{}_k{}_q{}".format(*c))
def test_rule_matches_float64_reference(seed: int, shape: tuple[int, int], case: tuple) -> None:
    t, rho, k, q = case
    gen = np.random.default_rng(seed)
    z = gen.normal(0, 3, size=shape).astype(np.float32)
    sv = safe_vocab(torch.from_numpy(z), temperature=t, min_p=rho, top_k=k, top_p=q)
    for i in range(shape[0]):
        ref = ref_rule(z[i], t, rho, k, q)
        got = sv.mask[i].numpy()
        diff = got != ref["keep"]
        # Sets are identical away from exact ties / rounding at a threshold.
        assert not (diff & ~near_boundary(z[i], t, rho, q)).any(), f"row {i}: sets differ"
        if diff.any():
            continue
        assert int(sv.safe_sizes[i]) == int(ref["keep"].sum())
        # Masked log-probs of every safe token, and the safe log-mass.
        s = ref["keep"]
        ref_masked = ref["u"][s] - ref["lse_s"]
        got_masked = (sv.scaled[i] - sv.log_z_safe[i]).double().numpy()[s]
        err = np.linalg.norm(got_masked - ref_masked) / max(np.linalg.norm(ref_masked), 1e-12)
        # log pi_S is 0 for a one-token set: compare absolutely there.
        assert err < 1e-6 or np.abs(got_masked - ref_masked).max() < 1e-6
        assert abs(float(sv.safe_logmass[i]) - ref["logmass"]) < 1e-5 * max(1, abs(ref["logmass"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_of_tokens_against_reference(dtype: torch.dtype) -> None:
    gen = np.random.default_rng(7)
    z = gen.normal(0, 4, size=(64, 5000)).astype(np.float32)
    logits = torch.from_numpy(z).to(dtype)
    zq = logits.float().numpy()  # the values the rule actually sees
    t, rho = 0.9, 1e-3
    sv = safe_vocab(logits, temperature=t, min_p=rho)
    tokens = sv.sample(torch.Generator().manual_seed(0))
    full, masked = sv.logprobs(tokens)
    ref_full, ref_masked = [], []
    for i, y in enumerate(tokens.tolist()):
        r = ref_rule(zq[i], t, rho, None, 1.0)
        ref_full.append(r["u"][y] - r["lse"])
        ref_masked.append(r["u"][y] - r["lse_s"])
    rf, rm = np.array(ref_full), np.array(ref_masked)
    assert np.linalg.norm(full.double().numpy() - rf) / np.linalg.norm(rf) < LOGP_RTOL[dtype]
    assert np.linalg.norm(masked.double().numpy() - rm) / np.linalg.norm(rm) < LOGP_RTOL[dtype]
    # masked = full - logmass, exactly as defined.
    assert torch.allclose(masked, full - sv.safe_logmass, atol=1e-5)


def test_top_k_ties_are_kept_like_vllm() -> None:
    z = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0]])
    mask = safe_mask(z, top_k=2)
    assert mask.tolist() == [[True, True, True, True, False, False]]


def test_min_p_tie_at_threshold_is_kept() -> None:
    # p_v / p_max == rho exactly: log(0.25) == -2*log(2); the rule keeps p >= rho * p_max.
    z = torch.tensor([[0.0, -math.log(4.0), -5.0]], dtype=torch.float64).float()
    assert safe_mask(z, min_p=0.25).tolist() == [[True, True, False]]


def test_greedy_is_argmax_and_reports_t1_logprob() -> None:
    z = torch.randn(8, 100, generator=torch.Generator().manual_seed(3))
    sv = safe_vocab(z, temperature=0.0)
    y = sv.sample(torch.Generator().manual_seed(0))
    assert torch.equal(y, z.argmax(-1))
    full, masked = sv.logprobs(y)
    assert torch.allclose(full, torch.log_softmax(z, -1).gather(-1, y[:, None]).squeeze(-1))
    assert torch.equal(masked, torch.zeros(8))
    assert torch.equal(sv.safe_sizes, torch.ones(8, dtype=torch.int64))


def test_per_row_parameters_equal_rowwise_calls() -> None:
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(4, 300, generator=gen) * 2
    temps, rhos = [1.0, 0.5, 0.0, 2.0], [0.0, 1e-2, 1e-3, 0.2]
    ks, qs = [0, 10, 0, 3], [0.9, 1.0, 1.0, 0.7]
    sv = safe_vocab(
        z,
        temperature=torch.tensor(temps),
        min_p=torch.tensor(rhos),
        top_k=torch.tensor(ks),
        top_p=torch.tensor(qs),
    )
    for i in range(4):
        one = safe_vocab(
            z[i : i + 1], temperature=temps[i], min_p=rhos[i], top_k=ks[i], top_p=qs[i]
        )
        assert torch.equal(sv.mask[i], one.mask[0])
        assert torch.allclose(sv.log_z_safe[i], one.log_z_safe[0])


def test_masked_logprob_of_token_outside_set_is_minus_inf() -> None:
    z = torch.tensor([[5.0, 0.0, -10.0]])
    sv = safe_vocab(z, min_p=0.01)
    _, masked = sv.logprobs(torch.tensor([2]))
    assert masked.item() == -math.inf


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"temperature": -0.1}, "temperature must be >= 0, got -0.1"),
        ({"min_p": 1.5}, "min_p must be in [0, 1], got 1.5"),
        ({"top_k": -1}, "top_k must be >= 0, got -1"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0"),
        ({"temperature": torch.ones(3)}, "temperature must be a scalar or shaped (2,)"),
    ],
)
def test_bad_parameters_raise_with_value(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError) as e:
        RuleParams.make(2, **kw)
    assert msg in str(e.value)


def test_logits_must_be_2d() -> None:
    with pytest.raises(ValueError, match=r"logits must be \(N, V\)"):
        safe_vocab(torch.zeros(2, 3, 4))


def _pi_s(z: torch.Tensor, **rule: float) -> np.ndarray:
    r = ref_rule(z.numpy(), rule.get("temperature", 1.0), rule.get("min_p", 0.0), None, 1.0)
    pi = np.where(r["keep"], np.exp(r["u"] - r["lse_s"]), 0.0)
    return pi


@pytest.mark.parametrize("per_row", [False, True])
def test_sampling_frequencies_match_pi_s(per_row: bool) -> None:
    """Chi-square goodness of fit of 200k draws against pi_S.

    With 200k draws the test has power against the unrenormalised-in-the-tail
    alternative: sampling from the full pi (tail not removed) would put
    1 - Z_S ~ 4% of the draws outside S, which is checked to be zero, and
    sampling pi_S at the wrong temperature moves chi-square by orders of magnitude
    (checked below on the same counts).
    """
    draws, v = 200_000, 60
    z = torch.from_numpy(np.random.default_rng(5).normal(0, 2, size=(1, v)).astype(np.float32))
    rule = {"temperature": 0.8, "min_p": 0.02}
    sv = safe_vocab(z.expand(draws, v).contiguous(), **rule)
    if per_row:  # one generator per row, as the engine does
        y = sv.sample([torch.Generator().manual_seed(i) for i in range(draws)])
    else:
        y = sv.sample(torch.Generator().manual_seed(123))
    counts = np.bincount(y.numpy(), minlength=v)
    pi = _pi_s(z[0], **rule)
    assert counts[pi == 0].sum() == 0, "a token outside S was sampled"
    s = pi > 0
    expected = pi[s] * draws
    assert expected.min() > 5, "chi-square needs >= 5 expected per cell"
    p_value = stats.chisquare(counts[s], expected).pvalue
    assert p_value > 1e-4
    # Power: the same counts reject pi_S at another temperature.
    wrong = _pi_s(z[0], temperature=0.9, min_p=0.02)
    assert stats.chisquare(counts[s], wrong[s] / wrong[s].sum() * draws).pvalue < 1e-6


def test_per_row_generators_make_rows_independent_of_batch_mates() -> None:
    z = torch.randn(6, 500, generator=torch.Generator().manual_seed(2))
    sv = safe_vocab(z, min_p=1e-3)
    ys = sv.sample([torch.Generator().manual_seed(100 + i) for i in range(6)])
    alone = safe_vocab(z[3:4], min_p=1e-3).sample([torch.Generator().manual_seed(103)])
    assert ys[3] == alone[0]


def test_values_float32_cannot_hold_keep_their_meaning() -> None:
    """A tiny positive top_p keeps one token (it would round to 0 in float32), and a
    temperature below 1e-5 is greedy (1/T would overflow to inf and NaN the row)."""
    z = torch.randn(4, 80, generator=torch.Generator().manual_seed(9))
    sv = safe_vocab(
        z,
        temperature=torch.tensor([1e-40, 5e-6, 2e-5, 1.0], dtype=torch.float64),
        top_p=torch.tensor([1.0, 1.0, 1.0, 5e-324], dtype=torch.float64),
    )
    assert torch.isfinite(sv.log_z_safe).all() and torch.isfinite(sv.log_z_full).all()
    assert sv.safe_sizes.tolist()[:2] == [1, 1] and sv.safe_sizes[3] == 1
    assert sv.safe_sizes[2] >= 1 and torch.equal(sv.sample()[:2], z[:2].argmax(-1))
    with pytest.raises(ValueError, match="top_p must be in"):
        safe_vocab(z, top_p=0.0)
