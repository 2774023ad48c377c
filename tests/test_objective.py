"""pruned_logprobs against float64 references: values, gradients, modes, memory, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _dvp_reference import rule_set, step_grad, step_logprobs
from dvp_client.train.objective import pruned_logprobs
from dvp_client.train.rule import RuleParams, safe_mask
from dvp_client.train.tensors import SafeSets
from dvp_schemas import PruningRule

# Log-prob tolerance against float64 on the same (dtype-rounded) logits: computing in
# float32 leaves ~1e-6; computing in bf16 would leave ~1e-2 and fail.
LOGP_ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float64: 1e-12}
# Gradients come back in the logits' dtype: bf16 keeps 8 bits of mantissa.
GRAD_ATOL = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float64: 1e-12}
SEEDS = [0, 1, 2]


def make(
    seed: int, b: int = 3, t: int = 7, v: int = 64, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Engine logits, trainer logits (engine + noise), engine sets (min-p 0.05), tokens in S."""
    g = torch.Generator().manual_seed(seed)
    z_eng = torch.randn(b, t, v, generator=g) * 3
    z_tr = (z_eng + 0.05 * torch.randn(b, t, v, generator=g)).to(dtype)
    mask = safe_mask(z_eng, min_p=0.05)
    y = torch.multinomial(mask.float().view(-1, v), 1, generator=g).view(b, t)
    return z_eng, z_tr, mask, y


def reference(
    z: torch.Tensor, s: torch.Tensor, y: torch.Tensor, temp: float
) -> dict[str, np.ndarray]:
    zz, ss, yy = z.double().numpy(), s.numpy(), y.numpy()
    b, t, _ = zz.shape
    out = {k: np.zeros((b, t)) for k in ("masked", "full", "log_z")}
    for i in range(b):
        for j in range(t):
            for k, val in step_logprobs(zz[i, j], ss[i, j], int(yy[i, j]), temp).items():
                out[k][i, j] = val
    return out


def widen(mask: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Sets with 40% of the vocabulary: a dense mask this full stays dense internally."""
    g = torch.Generator().manual_seed(seed)
    return mask | (torch.rand(mask.shape, generator=g) < 0.4)


def sets_as(form: str, mask: torch.Tensor, temp: float) -> SafeSets | torch.Tensor:
    """csr: SafeSets; dense: a sparse bool mask (converted to CSR inside); wide: a dense
    mask with large sets (kept dense inside)."""
    return SafeSets.from_mask(mask, temperature=temp) if form == "csr" else mask


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["csr", "dense", "wide"])
@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_replay_values_match_float64(seed: int, dtype: torch.dtype, form: str, temp: float) -> None:
    _, z, mask, y = make(seed, dtype=dtype)
    mask = widen(mask, seed) if form == "wide" else mask
    res = pruned_logprobs(z, y, sets_as(form, mask, temp), temp, chunk_size=3)
    ref = reference(z, mask, y, temp)
    tol = LOGP_ATOL[dtype]
    assert res.logprobs.dtype == torch.float32
    np.testing.assert_allclose(res.logprobs.detach().double(), ref["masked"], atol=tol, rtol=0)
    np.testing.assert_allclose(res.full_logprobs.detach().double(), ref["full"], atol=tol, rtol=0)
    np.testing.assert_allclose(res.log_z.double(), ref["log_z"], atol=tol, rtol=0)
    assert torch.equal(res.safe_sizes, mask.sum(-1))
    assert bool(res.mask.all())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["csr", "dense", "wide", "full"])
def test_gradient_is_onehot_minus_pi_s(seed: int, dtype: torch.dtype, form: str) -> None:
    """d/dz of sum(g_m log pi_S + g_f log p) = (g_m (e_y - pi_S 1_S) + g_f (e_y - p)) / T."""
    temp = 0.8
    _, z, mask, y = make(seed, dtype=dtype)
    mask = widen(mask, seed) if form == "wide" else mask
    if form == "full":
        mask = torch.ones_like(mask)
        safe: SafeSets | torch.Tensor = SafeSets.full(tuple(y.shape), temperature=temp)
    else:
        safe = sets_as(form, mask, temp)
    g = torch.Generator().manual_seed(100 + seed)
    g_m, g_f = torch.randn(y.shape, generator=g), torch.randn(y.shape, generator=g)
    x = z.clone().requires_grad_(True)
    res = pruned_logprobs(x, y, safe, temp, chunk_size=2)
    ((res.logprobs * g_m).sum() + (res.full_logprobs * g_f).sum()).backward()
    assert x.grad is not None and x.grad.dtype == dtype
    zz = z.double().numpy()
    for i in range(y.shape[0]):
        for j in range(y.shape[1]):
            want = step_grad(
                zz[i, j], mask[i, j].numpy(), int(y[i, j]), temp, float(g_m[i, j]), float(g_f[i, j])
            )
            got = x.grad[i, j].double().numpy()
            np.testing.assert_allclose(got, want, atol=GRAD_ATOL[dtype], rtol=1e-2)


@pytest.mark.parametrize("form", ["csr", "dense", "wide", "full"])
def test_gradcheck_float64(form: str) -> None:
    _, z, mask, y = make(5, b=2, t=3, v=9, dtype=torch.float64)
    mask = widen(mask) if form == "wide" else mask
    safe = SafeSets.full((2, 3)) if form == "full" else sets_as(form, mask, 0.9)
    keep = torch.tensor([[True, True, False], [True, True, True]])

    def f(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = pruned_logprobs(x, y, safe, 0.9, mask=keep, chunk_size=2)
        return r.logprobs, r.full_logprobs

    assert torch.autograd.gradcheck(f, (z.clone().requires_grad_(True),), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("form", ["csr", "wide"])
def test_without_full_the_masked_part_is_unchanged(form: str) -> None:
    """with_full=False: same log pi_S(y) and gradient, no log p(y) / log Z_S."""
    _, z, mask, y = make(15, v=200)
    mask = widen(mask) if form == "wide" else mask
    outs = []
    for with_full in (True, False):
        x = z.clone().requires_grad_(True)
        r = pruned_logprobs(x, y, sets_as(form, mask, 0.9), 0.9, with_full=with_full, chunk_size=4)
        r.logprobs.sum().backward()
        outs.append((r, x.grad))
    (a, ga), (b, gb) = outs
    assert b.full_logprobs is None and b.log_z is None and a.full_logprobs is not None
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=0, rtol=0)
    torch.testing.assert_close(ga, gb, atol=0, rtol=0)


def test_chunk_size_does_not_change_anything() -> None:
    _, z, mask, y = make(3, b=2, t=11, v=50)
    outs = []
    for chunk in (1, 4, 11, 1000):
        x = z.clone().requires_grad_(True)
        r = pruned_logprobs(x, y, SafeSets.from_mask(mask), 1.0, chunk_size=chunk)
        (r.logprobs.sum() + 0.5 * r.full_logprobs.sum()).backward()
        outs.append((r.logprobs.detach(), r.full_logprobs.detach(), x.grad))
    for o in outs[1:]:
        for a, b in zip(o, outs[0], strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_completion_slice_of_longer_logits() -> None:
    """A strided view [B, T, V] of [B, L, V] logits works and routes gradients to its rows."""
    _, z, mask, y = make(4, b=2, t=5, v=40)
    base = torch.randn(2, 9, 40).requires_grad_(True)
    with torch.no_grad():
        base[:, 3:8] = z
    view = base[:, 3:8]
    assert not view.is_contiguous()
    r = pruned_logprobs(view, y, SafeSets.from_mask(mask), 1.0)
    r.logprobs.sum().backward()
    ref = reference(z, mask, y, 1.0)["masked"]
    np.testing.assert_allclose(r.logprobs.detach().double(), ref, atol=2e-5)
    assert base.grad is not None
    assert base.grad[:, :3].abs().sum() == 0 and base.grad[:, 8:].abs().sum() == 0
    assert base.grad[:, 3:8].abs().sum() > 0


def test_full_sets_are_plain_log_softmax() -> None:
    _, z, _, y = make(6)
    r = pruned_logprobs(z, y, SafeSets.full(tuple(y.shape)), 0.9)
    want = torch.log_softmax(z.double() / 0.9, -1).gather(-1, y[..., None]).squeeze(-1)
    torch.testing.assert_close(r.logprobs.double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(r.full_logprobs, r.logprobs)
    assert r.log_z.abs().max() < 1e-6


def test_one_token_set_gives_zero_logprob_and_zero_gradient() -> None:
    _, z, _, y = make(7)
    one = torch.zeros(z.shape, dtype=torch.bool).scatter_(-1, y[..., None], True)
    x = z.clone().requires_grad_(True)
    r = pruned_logprobs(x, y, SafeSets.from_mask(one), 1.0)
    r.logprobs.sum().backward()
    assert r.logprobs.abs().max() == 0
    assert x.grad is not None and x.grad.abs().max() < 1e-7


def test_greedy_scores_at_temperature_one() -> None:
    """T = 0: S = {argmax}, masked log-prob 0, full log-prob at T = 1 (the rule's convention)."""
    _, z, _, _ = make(8)
    y = z.argmax(-1)
    r = pruned_logprobs(z, y, SafeSets.from_mask(safe_mask(z, temperature=0.0)), 0.0)
    assert r.logprobs.abs().max() == 0
    want = torch.log_softmax(z, -1).gather(-1, y[..., None]).squeeze(-1)
    torch.testing.assert_close(r.full_logprobs, want)


def test_masked_out_steps_are_zero_and_unchecked() -> None:
    _, z, mask, y = make(9)
    keep = torch.ones_like(y, dtype=torch.bool)
    keep[1, 4:] = False
    y = y.clone()
    y[1, 4:] = 10_000  # padding id outside the vocabulary: not checked where masked out
    sets = SafeSets.from_mask(mask & keep[..., None])  # padding steps have empty sets
    x = z.clone().requires_grad_(True)
    r = pruned_logprobs(x, y, sets, 1.0, mask=keep)
    (r.logprobs.sum() + r.full_logprobs.sum()).backward()
    assert r.logprobs[1, 4:].abs().sum() == 0 and r.full_logprobs[1, 4:].abs().sum() == 0
    assert x.grad is not None and x.grad[1, 4:].abs().sum() == 0
    assert torch.equal(r.mask, keep)
    assert r.safe_sizes[1, 4:].sum() == 0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rule", [(0.05, None, 1.0), (0.01, 5, 1.0), (0.0, None, 0.9)])
def test_recompute_matches_reference(seed: int, rule: tuple[float, int | None, float]) -> None:
    """S' from the trainer's logits by the rule; |S xor S'|; steps with y not in S' masked."""
    min_p, top_k, top_p = rule
    _z_eng, z, mask, y = make(seed, v=48)
    z = z + 0.8 * torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))  # big noise
    temp = 0.9
    pr = PruningRule(min_p=min_p, top_k=top_k, top_p=top_p)
    x = z.clone().requires_grad_(True)
    r = pruned_logprobs(x, y, SafeSets.from_mask(mask), temp, mode="recompute", rule=pr)
    r.logprobs.sum().backward()
    zz = z.double().numpy()
    b, t, _ = z.shape
    want_s = np.array(
        [[rule_set(zz[i, j], temp, min_p, top_k, top_p) for j in range(t)] for i in range(b)]
    )
    assert r.set_disagreement is not None and r.y_not_in_set is not None
    np.testing.assert_array_equal(r.set_disagreement.numpy(), (want_s ^ mask.numpy()).sum(-1))
    not_in = ~np.take_along_axis(want_s, y.numpy()[..., None], -1)[..., 0]
    np.testing.assert_array_equal(r.y_not_in_set.numpy(), not_in)
    np.testing.assert_array_equal(r.mask.numpy(), ~not_in)
    np.testing.assert_array_equal(r.safe_sizes.numpy(), want_s.sum(-1))
    ref = reference(z, torch.from_numpy(want_s), y, temp)
    got = r.logprobs.detach().double().numpy()
    np.testing.assert_allclose(got[~not_in], ref["masked"][~not_in], atol=2e-5)
    assert np.all(got[not_in] == 0)
    assert x.grad is not None
    assert x.grad[torch.from_numpy(not_in)].abs().sum() == 0  # dropped steps: no gradient


def test_recompute_with_identical_logits_agrees_with_replay() -> None:
    z_eng, _, _, _ = make(10)
    mask = safe_mask(z_eng, min_p=0.05, temperature=0.9)
    y = torch.multinomial(mask.float().view(-1, 64), 1).view(mask.shape[:2])
    sets = SafeSets(
        shape=tuple(y.shape),
        offsets=SafeSets.from_mask(mask).offsets,
        ids=SafeSets.from_mask(mask).ids,
        temperature=0.9,
        rule=PruningRule(min_p=0.05),
    )
    rep = pruned_logprobs(z_eng, y, sets)
    rec = pruned_logprobs(z_eng, y, sets, mode="recompute")  # rule and T from the sets
    assert rec.set_disagreement is not None and rec.set_disagreement.sum() == 0
    assert rec.y_not_in_set is not None and not bool(rec.y_not_in_set.any())
    torch.testing.assert_close(rec.logprobs, rep.logprobs)


def test_recompute_accepts_per_step_rule_params() -> None:
    _z_eng, z, mask, y = make(11)
    n = y.numel()
    params = RuleParams.make(n, temperature=1.0, min_p=torch.full((n,), 0.05), top_k=0)
    a = pruned_logprobs(z, y, mask, 1.0, mode="recompute", rule=params)
    b = pruned_logprobs(z, y, mask, 1.0, mode="recompute", rule=PruningRule(min_p=0.05))
    torch.testing.assert_close(a.logprobs, b.logprobs)
    assert a.set_disagreement is not None and b.set_disagreement is not None
    assert torch.equal(a.set_disagreement, b.set_disagreement)


def test_recompute_without_pruning_uses_full_sets() -> None:
    _, z, mask, y = make(12)
    r = pruned_logprobs(z, y, mask, 1.0, mode="recompute", rule=PruningRule())
    want = torch.log_softmax(z.double(), -1).gather(-1, y[..., None]).squeeze(-1)
    torch.testing.assert_close(r.logprobs.double(), want, atol=1e-5, rtol=0)
    assert r.set_disagreement is not None
    assert torch.equal(r.set_disagreement, 64 - mask.sum(-1))


def test_no_full_size_copy_is_saved_for_backward() -> None:
    """Saved tensors: the logits by reference, [B, T]-sized ones and the |S| scaled logits
    of each step; the naive path keeps a full-size float32 log-softmax (so this can fail)."""
    _, z, mask, y = make(13, b=2, t=16, v=256)

    def saved_bytes(fn: object) -> int:
        x = z.clone().requires_grad_(True)
        seen: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
            fn(x)  # type: ignore[operator]
        ptr = x.untyped_storage().data_ptr()
        return sum(
            t.numel() * t.element_size() for t in seen if t.untyped_storage().data_ptr() != ptr
        )

    sets = SafeSets.from_mask(mask)
    ours = saved_bytes(lambda x: pruned_logprobs(x, y, sets, 1.0).logprobs)
    naive = saved_bytes(
        lambda x: x.masked_fill(~mask, -math.inf).log_softmax(-1).gather(-1, y[..., None])
    )
    full = z.numel() * 4
    assert naive >= full
    assert ours <= 8 * y.numel() * 8 + int(mask.sum()) * 4  # a few [B, T] + the |S| logits


def _err(match: str) -> pytest.RaisesContext[ValueError]:
    return pytest.raises(ValueError, match=match)


def test_bad_input_names_what_and_where() -> None:
    _, z, mask, y = make(14)
    sets = SafeSets.from_mask(mask, temperature=1.0)
    with _err(r"tokens must be \[B, T\] = \[3, 7\].*got \[3, 6\]"):
        pruned_logprobs(z, y[:, :6], sets)
    with _err(r"logits must be \[B, T, V\]"):
        pruned_logprobs(z[0], y, sets)
    with _err(r"safe sets are for steps \[3, 7\], logits have \[3, 6\]"):
        pruned_logprobs(z[:, :6], y[:, :6], sets)
    with _err(r"a safe mask must be bool \[3, 7, 64\]"):
        pruned_logprobs(z, y, mask[..., :10], 1.0)
    bad = y.clone()
    bad[2, 5] = 64
    with _err(r"token id 64 at batch 2, step 5 is outside the vocabulary \[0, 64\)"):
        pruned_logprobs(z, bad, sets)
    bad[2, 5] = -1
    with _err(r"token id -1 at batch 2, step 5"):
        pruned_logprobs(z, bad, sets)
    holed = mask.clone()
    holed[1, 3, y[1, 3]] = False
    with _err(r"sampled token \d+ at batch 1, step 3 is not in its safe set"):
        pruned_logprobs(z, y, SafeSets.from_mask(holed, temperature=1.0))
    with _err(r"sampled token \d+ at batch 1, step 3 is not in its safe set"):
        pruned_logprobs(z, y, holed, 1.0)
    with _err(r"temperature 0.7 does not match the rollouts' temperature 1.0"):
        pruned_logprobs(z, y, sets, 0.7)
    with _err("temperature is required"):
        pruned_logprobs(z, y, mask)
    with _err("replay mode needs the engine's safe sets"):
        pruned_logprobs(z, y, None, 1.0)
    with _err("recompute mode needs rule="):
        pruned_logprobs(z, y, None, 1.0, mode="recompute")
    with _err("mode must be 'replay' or 'recompute'"):
        pruned_logprobs(z, y, sets, mode="both")  # type: ignore[arg-type]
    with _err(r"mask must be bool \[3, 7\]"):
        pruned_logprobs(z, y, sets, mask=torch.ones(3, 7))
    with _err("chunk_size must be >= 1"):
        pruned_logprobs(z, y, sets, chunk_size=0)
    assert sets.ids is not None
    ids = sets.ids.clone()
    ids[-1] = 99
    with _err(r"safe-set id 99 at batch 2, step 6 is outside the vocabulary \[0, 64\)"):
        pruned_logprobs(z, y, SafeSets((3, 7), sets.offsets, ids, temperature=1.0))
    with _err(r"rule temperature 0.5 does not match temperature 1.0"):
        pruned_logprobs(z, y, sets, mode="recompute", rule=RuleParams.make(21, temperature=0.5))


def test_dense_masks_take_the_sparse_path_when_small() -> None:
    from dvp_client.train._chunks import ChunkedSets

    _, _, mask, _ = make(0)
    small, wide = ChunkedSets.from_mask(mask), ChunkedSets.from_mask(widen(mask))
    assert small.dense is None and small.csr is not None  # the "dense" form above: CSR inside
    assert wide.dense is not None and wide.csr is None  # the "wide" form: dense inside
