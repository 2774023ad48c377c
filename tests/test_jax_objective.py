"""dvp_client.train.jax against float64 references and the torch implementation.

Random logits over several seeds, fp32 and bf16 inputs: the rule's sets equal torch's
(and the float64 reference's), the pruned log-probs and their gradients agree with a
float64 reference (relative error ``||out - ref|| / ||ref||``) and with torch's
``pruned_logprobs``; the fused head agrees with the logits path; edge cases: one-token
sets, the whole-vocabulary marker, fully masked rows, ties at the thresholds, jit.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from _dvp_reference import rule_set  # noqa: E402
from dvp_client.train.jax import (  # noqa: E402
    RuleArrays,
    mask_to_bitmap,
    pruned_logprobs,
    pruned_logprobs_from_hidden,
    safe_mask,
    unpack_bitmap,
)
from dvp_client.train.objective import pruned_logprobs as torch_pruned  # noqa: E402
from dvp_client.train.rule import safe_mask as torch_safe_mask  # noqa: E402
from dvp_schemas import PruningRule  # noqa: E402
from ml_dtypes import bfloat16  # noqa: E402

SEEDS = (0, 1, 2)
# Relative error against float64: float32 math everywhere, so both dtypes are tight
# on values (bf16 inputs are exact in float32); a bf16 gradient is rounded to bf16.
VALUE_RTOL = {"float32": 2e-6, "bfloat16": 2e-6}
GRAD_RTOL = {"float32": 2e-6, "bfloat16": 8e-3}
RULES = [
    dict(min_p=0.0, top_k=0, top_p=1.0),
    dict(min_p=0.05, top_k=0, top_p=1.0),
    dict(min_p=1e-3, top_k=7, top_p=1.0),
    dict(min_p=0.0, top_k=0, top_p=0.8),
    dict(min_p=0.01, top_k=5, top_p=0.9),
]


def rel(out: np.ndarray, ref: np.ndarray) -> float:
    return float(
        np.linalg.norm(np.asarray(out, np.float64) - ref) / max(float(np.linalg.norm(ref)), 1e-30)
    )


def batch(seed: int, b: int = 3, t: int = 6, v: int = 77, dtype: str = "float32"):  # type: ignore[no-untyped-def]
    """Logits (in ``dtype``), tokens, engine-like sets (min-p 0.02 around y), mask."""
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(b, t, v)) * 3).astype(np.float32)
    z = z.astype(bfloat16) if dtype == "bfloat16" else z
    y = rng.integers(0, v, size=(b, t))
    sets = rng.random((b, t, v)) < 0.3
    sets[np.arange(b)[:, None], np.arange(t)[None], y] = True
    mask = rng.random((b, t)) < 0.85
    return z, y, sets, mask


def ref_logprobs(
    z: np.ndarray, y: np.ndarray, sets: np.ndarray, temp: float
) -> tuple[np.ndarray, ...]:
    """Float64 ``log pi_S(y)``, ``log p(y)``, ``log Z_S`` and the gradient of their sum."""
    u = np.asarray(z, np.float64) / temp
    lse_v = np.log(np.exp(u - u.max(-1, keepdims=True)).sum(-1)) + u.max(-1)
    us = np.where(sets, u, -np.inf)
    ms = us.max(-1)
    lse_s = np.log(np.exp(us - ms[..., None]).sum(-1)) + ms
    u_y = np.take_along_axis(u, y[..., None], -1)[..., 0]
    p = np.exp(u - lse_v[..., None])
    pi_s = np.where(sets, np.exp(u - lse_s[..., None]), 0.0)
    onehot = np.arange(u.shape[-1]) == y[..., None]
    # d/dz [logpi_S + 0.5 log p + 0.25 log Z_S]
    grad = (onehot - pi_s + 0.5 * (onehot - p) + 0.25 * (pi_s - p)) / temp
    return u_y - lse_s, u_y - lse_v, lse_s - lse_v, grad


def objective(res, mask):  # type: ignore[no-untyped-def]
    return jnp.sum(jnp.where(mask, res.logprobs + 0.5 * res.full_logprobs + 0.25 * res.log_z, 0.0))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("seed", SEEDS)
def test_replay_values_and_grads_match_float64(seed: int, dtype: str) -> None:
    z, y, sets, mask = batch(seed, dtype=dtype)
    temp = 0.7
    bm = mask_to_bitmap(sets)
    zj, yj, mj = jnp.asarray(z), jnp.asarray(y), jnp.asarray(mask)

    def f(zz):  # type: ignore[no-untyped-def]
        res = pruned_logprobs(zz, yj, bm, temp, mask=mj, chunk_size=4)
        return objective(res, mj), res

    (_, res), grad = jax.value_and_grad(f, has_aux=True)(zj)
    masked, full, log_z, g_ref = ref_logprobs(z, y, sets, temp)
    assert grad.dtype == zj.dtype and res.logprobs.dtype == jnp.float32
    for out, ref in ((res.logprobs, masked), (res.full_logprobs, full), (res.log_z, log_z)):
        assert rel(np.where(mask, out, 0), np.where(mask, ref, 0)) < VALUE_RTOL[dtype]
        assert np.all(np.asarray(out)[~mask] == 0)
    g_ref = np.where(mask[..., None], g_ref, 0.0)
    assert rel(np.asarray(grad, np.float64), g_ref) < GRAD_RTOL[dtype]
    np.testing.assert_array_equal(res.safe_sizes, np.where(mask, sets.sum(-1), 0))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("seed", SEEDS)
def test_replay_matches_torch(seed: int, dtype: str) -> None:
    z, y, sets, mask = batch(seed + 10, dtype=dtype)
    zt = torch.tensor(np.asarray(z, np.float32))
    zt = zt.bfloat16() if dtype == "bfloat16" else zt
    zt.requires_grad_(True)
    mt = torch.from_numpy(mask)
    rt = torch_pruned(zt, torch.from_numpy(y), torch.from_numpy(sets), 1.3, mask=mt)
    assert rt.full_logprobs is not None and rt.log_z is not None
    torch.where(mt, rt.logprobs + 0.5 * rt.full_logprobs, 0).sum().backward()
    assert zt.grad is not None
    mj = jnp.asarray(mask)

    def f(zz):  # type: ignore[no-untyped-def]
        r = pruned_logprobs(zz, jnp.asarray(y), mask_to_bitmap(sets), 1.3, mask=mj)
        return jnp.sum(jnp.where(mj, r.logprobs + 0.5 * r.full_logprobs, 0.0)), r

    (_, rj), gj = jax.value_and_grad(f, has_aux=True)(jnp.asarray(z))
    for a, b in (
        (rj.logprobs, rt.logprobs),
        (rj.full_logprobs, rt.full_logprobs),
        (rj.log_z, rt.log_z),
    ):
        np.testing.assert_allclose(np.asarray(a), b.detach().numpy(), atol=2e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(rj.mask), rt.mask.numpy())
    tol = 1e-6 if dtype == "float32" else 8e-3  # bf16 gradients: one rounding apart
    np.testing.assert_allclose(
        np.asarray(gj, np.float32), zt.grad.float().numpy(), atol=tol * 4, rtol=tol
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rule", RULES, ids=lambda r: "-".join(f"{k}{v}" for k, v in r.items()))
def test_rule_matches_torch_and_float64(seed: int, rule: dict[str, float]) -> None:
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(16, 300)) * 2.5).astype(np.float32)
    temp = rng.choice([0.0, 0.6, 1.0, 1.4], size=16).astype(np.float32)
    got = np.asarray(safe_mask(jnp.asarray(z), RuleArrays(jnp.asarray(temp), **rule)))
    want = torch_safe_mask(torch.from_numpy(z), temperature=torch.from_numpy(temp), **rule).numpy()  # type: ignore[arg-type]
    np.testing.assert_array_equal(got, want)
    for i in range(16):  # the float64 reference (continuous data: no ties at the cuts)
        ref = rule_set(
            z[i], float(temp[i]), rule["min_p"], int(rule["top_k"]) or None, rule["top_p"]
        )
        assert np.array_equal(got[i], ref), i


def test_rule_per_row_parameters_and_ties() -> None:
    z = jnp.asarray(
        [
            [1.0, 3.0, 2.0, 2.0, 0.0, -1.0],  # top-k 2 keeps the tie at the 2nd value
            [1.0, 3.0, 3.0, 0.0, -1.0, 2.9],  # min_p 1: the argmax and its exact tie
            [0.0, np.log(0.1), -5.0, -5.0, -5.0, -5.0],  # p_1 = 0.1 p_0 exactly: kept
        ]
    )
    params = RuleArrays(
        temperature=1.0, min_p=jnp.asarray([0.0, 1.0, 0.1]), top_k=jnp.asarray([2, 0, 0])
    )
    got = np.asarray(safe_mask(z, params))
    assert got[0].nonzero()[0].tolist() == [1, 2, 3]
    assert got[1].nonzero()[0].tolist() == [1, 2]
    want = torch_safe_mask(torch.tensor(np.asarray(z)), min_p=torch.tensor([0.0, 1.0, 0.1]),
                           top_k=torch.tensor([2, 0, 0])).numpy()  # fmt: skip
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", SEEDS)
def test_recompute_matches_torch(seed: int) -> None:
    z, y, _, mask = batch(seed + 20, v=120)
    rule = PruningRule(min_p=0.03, top_k=20, top_p=0.95)
    eng = torch_safe_mask(torch.from_numpy(z * 1.01), temperature=0.9, min_p=0.03,
                          top_k=20, top_p=0.95)  # fmt: skip
    y = np.where(mask, y, 0)
    eng[np.arange(3)[:, None], np.arange(6)[None], y] = True  # the engine's S holds y
    rt = torch_pruned(torch.from_numpy(z), torch.from_numpy(y), eng, 0.9, mode="recompute",
                      rule=rule, mask=torch.from_numpy(mask))  # fmt: skip
    rj = pruned_logprobs(
        jnp.asarray(z), jnp.asarray(y), mask_to_bitmap(eng.numpy()), 0.9, mode="recompute",
        rule=RuleArrays(min_p=0.03, top_k=20, top_p=0.95), mask=jnp.asarray(mask),
    )  # fmt: skip
    assert rt.y_not_in_set is not None and rt.set_disagreement is not None
    assert rj.y_not_in_set is not None and rj.set_disagreement is not None
    assert rt.y_not_in_set.any()  # most random tokens fall outside S'
    np.testing.assert_array_equal(np.asarray(rj.y_not_in_set), rt.y_not_in_set.numpy())
    np.testing.assert_array_equal(np.asarray(rj.set_disagreement), rt.set_disagreement.numpy())
    np.testing.assert_array_equal(np.asarray(rj.safe_sizes), rt.safe_sizes.numpy())
    np.testing.assert_allclose(np.asarray(rj.logprobs), rt.logprobs.numpy(), atol=2e-5)
    assert rt.full_logprobs is not None
    np.testing.assert_allclose(np.asarray(rj.full_logprobs), rt.full_logprobs.numpy(), atol=2e-5)


def test_edge_cases_one_token_marker_fully_masked() -> None:
    z, y, sets, _ = batch(5, b=3, t=4, v=50)
    sets[0] = False
    sets[0, np.arange(4), y[0]] = True  # one-token sets: log pi_S = 0, no gradient
    sets[1] = True  # the whole-vocabulary marker: log pi_S = log p, log Z_S = 0
    mask = np.ones((3, 4), bool)
    mask[2] = False  # a fully masked row: zeros, no gradient, no NaN
    mj = jnp.asarray(mask)

    def f(zz):  # type: ignore[no-untyped-def]
        r = pruned_logprobs(zz, jnp.asarray(y), mask_to_bitmap(sets), 1.0, mask=mj)
        return jnp.sum(r.logprobs), r

    (_, r), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(z))
    # one-token sets: 0 up to float32 rounding (one exp and one log per step)
    np.testing.assert_allclose(np.asarray(r.logprobs[0]), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g[0]), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(r.logprobs[1]), np.asarray(r.full_logprobs[1]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(r.log_z[1]), 0.0, atol=1e-6)
    assert np.all(np.asarray(r.logprobs[2]) == 0) and np.all(np.asarray(g[2]) == 0)
    assert np.isfinite(np.asarray(g)).all()
    assert r.safe_sizes.tolist() == [[1] * 4, [50] * 4, [0] * 4]


def test_errors_name_the_problem() -> None:
    z, y, sets, _ = batch(6, v=40)
    sets[1, 2, y[1, 2]] = False
    with pytest.raises(ValueError, match="batch 1, step 2 is not in its safe set"):
        pruned_logprobs(jnp.asarray(z), jnp.asarray(y), mask_to_bitmap(sets))
    with pytest.raises(ValueError, match="replay mode needs"):
        pruned_logprobs(jnp.asarray(z), jnp.asarray(y))
    with pytest.raises(ValueError, match="tokens must be integer"):
        pruned_logprobs(jnp.asarray(z), jnp.asarray(y, jnp.float32), mask_to_bitmap(sets))


def test_jit_equals_eager_and_bitmap_round_trips() -> None:
    z, y, sets, mask = batch(7, v=83)  # V not a multiple of 8
    bm = mask_to_bitmap(sets)
    assert bm.shape == (3, 6, 11)
    np.testing.assert_array_equal(np.asarray(unpack_bitmap(bm, 83)), sets)
    args = (jnp.asarray(z), jnp.asarray(y), bm)
    eager = pruned_logprobs(*args, 0.8, mask=jnp.asarray(mask), chunk_size=5)
    jitted = jax.jit(lambda a, b, c, m: pruned_logprobs(a, b, c, 0.8, mask=m, chunk_size=5))(
        *args, jnp.asarray(mask)
    )
    np.testing.assert_allclose(np.asarray(jitted.logprobs), np.asarray(eager.logprobs), atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("v", "tile"), [(96, 32), (101, 24), (64, 1000)])
def test_fused_head_matches_logits_path(v: int, tile: int, dtype: str) -> None:
    rng = np.random.default_rng(v + tile)
    b, t, h = 2, 5, 16
    hid = rng.normal(size=(b, t, h)).astype(np.float32)
    w = rng.normal(size=(v, h)).astype(np.float32)
    if dtype == "bfloat16":
        hid, w = hid.astype(bfloat16), w.astype(bfloat16)
    y = rng.integers(0, v, size=(b, t))
    sets = rng.random((b, t, v)) < 0.4
    sets[np.arange(b)[:, None], np.arange(t)[None], y] = True
    mask = rng.random((b, t)) < 0.8
    mj, bm = jnp.asarray(mask), mask_to_bitmap(sets)

    def fused(hh, ww):  # type: ignore[no-untyped-def]
        r = pruned_logprobs_from_hidden(hh, ww, jnp.asarray(y), bm, 0.9, mask=mj, tile_size=tile)
        return objective(r, mj), r

    (_, rf), (gh, gw) = jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)(
        jnp.asarray(hid), jnp.asarray(w)
    )
    assert gh.dtype == jnp.asarray(hid).dtype and gw.dtype == jnp.asarray(w).dtype
    # float64 reference through the logits
    h64, w64 = np.asarray(hid, np.float64), np.asarray(w, np.float64)
    logits = h64 @ w64.T
    masked, full, _, g_logits = ref_logprobs(logits, y, sets, 0.9)
    g_logits = np.where(mask[..., None], g_logits, 0.0)
    assert rel(np.where(mask, rf.logprobs, 0), np.where(mask, masked, 0)) < 1e-5
    assert rel(np.where(mask, rf.full_logprobs, 0), np.where(mask, full, 0)) < 1e-5
    tol = 1e-5 if dtype == "float32" else 8e-3
    assert rel(np.asarray(gh, np.float64), g_logits @ w64) < tol
    assert rel(np.asarray(gw, np.float64), np.einsum("btv,bth->vh", g_logits, h64)) < tol


def test_fused_head_recompute_matches_logits_path() -> None:
    rng = np.random.default_rng(3)
    hid = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(60, 8)) * 2, jnp.float32)
    y = jnp.asarray(rng.integers(0, 60, size=(2, 4)))
    rule = RuleArrays(min_p=0.05, top_k=10)
    rf = pruned_logprobs_from_hidden(
        hid, w, y, None, 1.0, mode="recompute", rule=rule, tile_size=16
    )
    logits = jnp.einsum("bth,vh->btv", hid, w, precision="highest")
    rl = pruned_logprobs(logits, y, None, 1.0, mode="recompute", rule=rule)
    assert rf.y_not_in_set is not None and rl.y_not_in_set is not None
    np.testing.assert_array_equal(np.asarray(rf.y_not_in_set), np.asarray(rl.y_not_in_set))
    np.testing.assert_allclose(np.asarray(rf.logprobs), np.asarray(rl.logprobs), atol=1e-5)
