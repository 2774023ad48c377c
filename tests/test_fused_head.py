"""pruned_logprobs_from_hidden against a float64 reference: values, gradients to the hidden
states and the weight, the sparse path, recompute mode, extra memory, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from dvp_client.train.fused_head import pruned_logprobs_from_hidden
from dvp_client.train.objective import pruned_logprobs
from dvp_client.train.rule import safe_mask
from dvp_client.train.tensors import SafeSets
from dvp_schemas import PruningRule
from torch.profiler import ProfilerActivity, profile

SEEDS = [0, 1, 2]
# Against float64 on the same (dtype-rounded) inputs: float32 math leaves ~1e-6.
LOGP_ATOL = {torch.float32: 3e-5, torch.bfloat16: 3e-5, torch.float64: 1e-11}
# Relative Frobenius error of the gradients (they come back in the input dtype).
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-11}
# A tile of 24 elements: tiles of 4 steps x 6 vocabulary rows (several in each direction).
SMALL_TILE = 24


def make(
    seed: int, b: int = 3, t: int = 7, h: int = 16, v: int = 96, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states, LM head, engine sets (min-p 0.05 on the logits) and tokens in S."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.8
    logits = hidden @ weight.t()
    mask = safe_mask(logits, min_p=0.05)
    y = torch.multinomial(mask.float().view(-1, v), 1, generator=g).view(b, t)
    return hidden.to(dtype), weight.to(dtype), mask, y


def widen(mask: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Sets with 40% of the vocabulary: a dense mask this full stays dense internally."""
    g = torch.Generator().manual_seed(seed)
    return mask | (torch.rand(mask.shape, generator=g) < 0.4)


def safe_as(form: str, mask: torch.Tensor, temp: float) -> SafeSets | torch.Tensor:
    if form == "csr":
        return SafeSets.from_mask(mask, temperature=temp)
    if form == "full":
        return SafeSets.full(tuple(mask.shape[:2]), temperature=temp)
    return mask  # "dense" (small sets: CSR inside) or "wide" (kept dense)


def sets_mask(form: str, mask: torch.Tensor, seed: int) -> torch.Tensor:
    if form == "wide":
        return widen(mask, seed)
    return torch.ones_like(mask) if form == "full" else mask


def reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    y: torch.Tensor,
    temp: float,
) -> dict[str, torch.Tensor]:
    """The naive float64 computation (full logits, masked log-softmax), differentiable."""
    u = (hidden @ weight.t()) / (1.0 if temp == 0 else temp)
    full = u.log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)
    masked = u.masked_fill(~mask, -math.inf).log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)
    return {"masked": masked, "full": full, "log_z": (masked - full).neg()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-300))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["csr", "dense", "wide", "full"])
@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_values_and_gradients_match_float64(
    seed: int, dtype: torch.dtype, form: str, temp: float
) -> None:
    hidden, weight, mask, y = make(seed, dtype=dtype)
    mask = sets_mask(form, mask, seed)
    x, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    res = pruned_logprobs_from_hidden(
        x, w, y, safe_as(form, mask, temp), temp, tile_elements=SMALL_TILE
    )
    x64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    ref = reference(x64, w64, mask, y, temp)
    tol = LOGP_ATOL[dtype]
    assert res.logprobs.dtype == torch.float32 and res.full_logprobs is not None
    torch.testing.assert_close(res.logprobs.double(), ref["masked"].detach(), atol=tol, rtol=0)
    torch.testing.assert_close(res.full_logprobs.double(), ref["full"].detach(), atol=tol, rtol=0)
    assert res.log_z is not None
    torch.testing.assert_close(res.log_z.double(), ref["log_z"].detach(), atol=tol, rtol=0)
    assert torch.equal(res.safe_sizes, mask.sum(-1))
    g = torch.Generator().manual_seed(100 + seed)
    g_m, g_f = torch.randn(y.shape, generator=g), torch.randn(y.shape, generator=g)
    ((res.logprobs * g_m).sum() + (res.full_logprobs * g_f).sum()).backward()
    ((ref["masked"] * g_m.double()).sum() + (ref["full"] * g_f.double()).sum()).backward()
    assert x.grad is not None and w.grad is not None
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    assert x64.grad is not None and w64.grad is not None
    assert rel(x.grad, x64.grad) < GRAD_RTOL[dtype]
    assert rel(w.grad, w64.grad) < GRAD_RTOL[dtype]


@pytest.mark.parametrize("form", ["csr", "wide", "full"])
@pytest.mark.parametrize("with_full", [True, False])
def test_gradcheck_float64(form: str, with_full: bool) -> None:
    hidden, weight, mask, y = make(5, b=2, t=3, h=4, v=11, dtype=torch.float64)
    mask = sets_mask(form, mask, 5)
    safe = safe_as(form, mask, 0.9)
    keep = torch.tensor([[True, True, False], [True, True, True]])

    def f(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        r = pruned_logprobs_from_hidden(
            x, w, y, safe, 0.9, mask=keep, tile_elements=12, with_full=with_full
        )
        return (r.logprobs,) if r.full_logprobs is None else (r.logprobs, r.full_logprobs)

    args = (hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("seed", SEEDS)
def test_same_as_pruned_logprobs_on_the_logits(seed: int) -> None:
    """Every output equals pruned_logprobs on hidden @ W^T (float32, masked-out steps)."""
    hidden, weight, mask, y = make(seed, b=2, t=9, v=80)
    keep = torch.rand(y.shape, generator=torch.Generator().manual_seed(seed)) < 0.7
    sets = SafeSets.from_mask(mask, temperature=0.8)
    a = pruned_logprobs_from_hidden(hidden, weight, y, sets, mask=keep, tile_elements=50)
    b = pruned_logprobs(hidden @ weight.t(), y, sets, mask=keep)
    for name in ("logprobs", "full_logprobs", "log_z"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=0)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.safe_sizes, b.safe_sizes)
    assert bool((a.logprobs[~keep] == 0).all())


def test_sparse_path_reads_only_the_rows_in_the_sets() -> None:
    """with_full=False, CSR sets: rows of W outside every S are never read (NaN there
    changes nothing) and get a zero gradient; the dense path would read them."""
    hidden, weight, mask, y = make(7, v=200)
    used = mask.reshape(-1, 200).any(0)
    poisoned = weight.clone()
    poisoned[~used] = math.nan
    sets = SafeSets.from_mask(mask, temperature=1.0)
    outs = []
    for w0 in (weight, poisoned):
        x, w = hidden.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        r = pruned_logprobs_from_hidden(x, w, y, sets, with_full=False, tile_elements=64)
        r.logprobs.sum().backward()
        outs.append((r.logprobs, x.grad, w.grad))
    (lp, gx, gw), (lp_p, gx_p, gw_p) = outs
    assert gx is not None and gw is not None and gx_p is not None and gw_p is not None
    assert bool(torch.isfinite(lp_p).all()) and bool(torch.isfinite(gx_p).all())
    torch.testing.assert_close(lp_p, lp, atol=0, rtol=0)
    torch.testing.assert_close(gx_p, gx, atol=0, rtol=0)
    assert bool((gw_p[~used] == 0).all()) and bool((gw[~used] == 0).all())
    torch.testing.assert_close(gw_p[used], gw[used], atol=0, rtol=0)
    dense = pruned_logprobs_from_hidden(hidden, poisoned, y, sets, with_full=True)
    assert dense.full_logprobs is not None and bool(dense.full_logprobs.isnan().all())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rule", [(0.05, None, 1.0), (0.01, 5, 0.9)])
def test_recompute_matches_pruned_logprobs(
    seed: int, rule: tuple[float, int | None, float]
) -> None:
    hidden, weight, mask, y = make(seed, b=2, t=6, v=64)
    engine_sets = SafeSets.from_mask(mask, temperature=1.0)
    pr = PruningRule(min_p=rule[0], top_k=rule[1], top_p=rule[2])
    kw = {"mode": "recompute", "rule": pr, "chunk_size": 4}
    a = pruned_logprobs_from_hidden(hidden, weight, y, engine_sets, tile_elements=30, **kw)
    b = pruned_logprobs(hidden @ weight.t(), y, engine_sets, **kw)
    assert a.set_disagreement is not None and b.set_disagreement is not None
    assert torch.equal(a.set_disagreement, b.set_disagreement)
    assert a.y_not_in_set is not None and b.y_not_in_set is not None
    assert torch.equal(a.y_not_in_set, b.y_not_in_set) and torch.equal(a.mask, b.mask)
    assert torch.equal(a.safe_sizes, b.safe_sizes)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def test_greedy_scores_at_temperature_one() -> None:
    hidden, weight, _, _ = make(4)
    y = (hidden @ weight.t()).argmax(-1)
    one = torch.zeros(3, 7, 96, dtype=torch.bool).scatter_(-1, y[..., None], True)
    r = pruned_logprobs_from_hidden(hidden, weight, y, SafeSets.from_mask(one), 0.0)
    ref = reference(hidden.double(), weight.double(), one, y, 1.0)
    assert bool((r.logprobs == 0).all())
    assert r.full_logprobs is not None
    torch.testing.assert_close(r.full_logprobs.double(), ref["full"], atol=3e-5, rtol=0)


def _extra_peak(fn: object) -> int:
    """Peak of (allocated - freed) bytes during fn() (profiler memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()  # type: ignore[operator]
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("grad_full", [False, True])
def test_extra_memory_is_a_tile_not_the_logits(grad_full: bool) -> None:
    """[2, 256] steps x V = 8192 (16 MiB of float32 logits): forward + backward of the
    fused head stays under 1/8 of that (one 256 KiB tile, the 256 KiB weight gradient);
    the naive head allocates several logits-sized tensors."""
    b, t, h, v = 2, 256, 8, 8192
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, t, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    y = torch.randint(0, v, (b, t), generator=g)
    sets = SafeSets.full((b, t), temperature=1.0)

    def fused() -> None:
        r = pruned_logprobs_from_hidden(hidden, weight, y, sets, tile_elements=1 << 16)
        assert r.full_logprobs is not None
        (r.logprobs.sum() + (r.full_logprobs.sum() if grad_full else 0.0)).backward()

    def naive() -> None:
        (hidden @ weight.t()).log_softmax(-1).gather(-1, y[..., None]).sum().backward()

    logits_bytes = b * t * v * 4
    assert _extra_peak(naive) >= 2 * logits_bytes
    assert _extra_peak(fused) < logits_bytes / 8


def test_sparse_backward_allocates_the_weight_gradient_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CSR sets, only ``log pi_S(y)`` differentiated: the largest buffer of the backward is
    the ``(V, H)`` weight gradient, built a block of rows at a time. One CSR x dense
    matmul over all V rows (a single block) allocates it twice, which this detects."""
    b, t, h, v = 2, 128, 64, 8192
    hidden, weight, _, _ = make(0, b, t, h, v)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    with torch.no_grad():
        mask = safe_mask(hidden @ weight.t(), min_p=0.05)
    g = torch.Generator().manual_seed(1)
    y = torch.multinomial(mask.float().view(-1, v), 1, generator=g).view(b, t)
    sets = SafeSets.from_mask(mask, temperature=1.0)

    def fused() -> None:
        hidden.grad = weight.grad = None
        r = pruned_logprobs_from_hidden(hidden, weight, y, sets, with_full=False)
        r.logprobs.sum().backward()

    grad_w_bytes = v * h * 4
    block = "dvp_client.train._fused._BLOCK_ELEMENTS"
    monkeypatch.setattr(block, v * h // 16)  # blocks of V / 16 rows (the default: 2 Mi)
    assert _extra_peak(fused) < 1.5 * grad_w_bytes
    monkeypatch.setattr(block, v * h)  # one block
    assert _extra_peak(fused) >= 2 * grad_w_bytes


@pytest.mark.parametrize("mode", ["replay", "recompute"])
def test_float32_math_under_a_callers_autocast(mode: str) -> None:
    """Inside ``torch.autocast(cpu, bfloat16)`` (a trainer's mixed precision) the head still
    computes in float32: values and gradients equal those computed without autocast. An
    ``mm`` left to autocast would round the logits to bf16 (errors ~1e-2 here)."""
    hidden, weight, mask, y = make(3, b=2, t=9, h=32, v=512)
    sets = SafeSets.from_mask(mask, temperature=0.7)
    rule = PruningRule(min_p=0.05)

    def run(autocast: bool) -> tuple[torch.Tensor, ...]:
        x = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            r = pruned_logprobs_from_hidden(x, w, y, sets, mode=mode, rule=rule)
            assert r.full_logprobs is not None
            (r.logprobs.sum() + r.full_logprobs.sum()).backward()
        assert x.grad is not None and w.grad is not None
        return r.logprobs.detach(), r.full_logprobs.detach(), x.grad, w.grad

    for a, b in zip(run(True), run(False), strict=True):
        assert a.dtype == torch.float32
        assert rel(a, b) < 1e-6


def _err(match: str) -> pytest.RaisesContext[ValueError]:
    return pytest.raises(ValueError, match=match)


def test_bad_input_names_what() -> None:
    hidden, weight, mask, y = make(0)
    sets = SafeSets.from_mask(mask, temperature=1.0)
    with _err(r"hidden must be \[B, T, H\]"):
        pruned_logprobs_from_hidden(hidden[0], weight, y, sets)
    with _err(r"lm_head_weight must be \(V, H\) with H = 16"):
        pruned_logprobs_from_hidden(hidden, weight[:, :8], y, sets)
    with _err("tokens must be"):
        pruned_logprobs_from_hidden(hidden, weight, y[:, :3], sets)
    with _err("token id 96 at batch 0, step 2"):
        pruned_logprobs_from_hidden(
            hidden, weight, y.clone().index_fill_(1, torch.tensor(2), 96), sets
        )
    with _err("does not match the rollouts' temperature"):
        pruned_logprobs_from_hidden(hidden, weight, y, sets, 0.5)
    with _err("tile_elements must be >= 1"):
        pruned_logprobs_from_hidden(hidden, weight, y, sets, tile_elements=0)
    bad = mask.clone()
    bad[1, 4, y[1, 4]] = False
    with _err("sampled token .* at batch 1, step 4 is not in its safe set"):
        pruned_logprobs_from_hidden(hidden, weight, y, bad, 1.0)
