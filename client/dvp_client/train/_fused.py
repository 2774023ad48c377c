"""Pruned log-probs from hidden states, never building the ``[B, T, V]`` logits (internal).

The public entry point is :func:`dvp_client.train.fused_head.pruned_logprobs_from_hidden`.
With ``z = h W^T`` (``h`` ``(N, H)`` the hidden states of the N computed steps, ``W``
``(V, H)`` the LM head), ``u = z / T`` and the formulas of :mod:`dvp_client.train._chunks`,
the gradient with respect to the logits splits into three parts::

    dL/dz_k = (c_m + c_f) 1[k = y]                      one-hot: the rows W[y]
            - c_m pi_S(k) 1[k in S]                     CSR sets: the |S| rows W[S]
            - c_f p(k) - c_m pi_S(k) 1[k in S]          dense: every row (tiles)
    c_m = g_m / T,  c_f = g_f / T                       (g: incoming gradients)

(the dense line carries ``c_m`` only for full or dense-mask sets; the CSR line only for
CSR sets), and ``dL/dh = (dL/dz) W``, ``dL/dW = (dL/dz)^T h``. The sparse parts are
CSR matrices over the (step, token) pairs: ``sampled_addmm`` for their logits in
forward, CSR x dense matmuls for ``C W`` and ``C^T h`` in backward; the dense
part runs over tiles of ``n_t`` steps by ``n_v`` vocabulary rows: ``z`` is recomputed by
one matmul per tile, turned into its gradient in place and folded into ``dL/dh`` and an
fp32 ``dL/dW`` by two more. Forward needs the dense tiles only for ``log p(y)`` /
``log Z_S`` (an online logsumexp over the vocabulary tiles) or for full / dense-mask
sets; ``log pi_S(y)`` over CSR sets reads only the ``|S|`` rows of ``W`` and ``W[y]``.

Extra memory: one ``(n_t, n_v)`` tile (plus one more for dense-mask sets), the fp32
``(V, H)`` weight gradient (built a block of rows at a time: no second copy), ``(N, H)``
copies of the hidden states, ``(N,)`` vectors and ``O(nnz)`` for the sets. Math is
float32 (float64 for float64 hidden states), whatever the input dtypes; a weight in
another dtype is upcast once per call (a ``(V, H)`` copy).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._chunks import ChunkedSets, compute_dtype

__all__ = ["DEFAULT_TILE_ELEMENTS", "FusedSets", "fused_pruned_logprobs"]

# Elements of one (steps x vocabulary) tile: 16 Mi -> 64 MiB of float32, in 4096 x 4096
# tiles (n_t = sqrt): the weight gradient is swept once per 4096 steps, not once per row.
DEFAULT_TILE_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class FusedSets:
    """The sets of the N computed steps (rows of the compact ``(N, H)`` hidden states).

    Exactly one of: ``rows``/``ids`` (CSR entries, int64 ``(nnz,)`` each, sorted by
    row), ``dense`` (bool ``(B * T, V)``, indexed through ``steps``) or neither (full).
    """

    steps: Tensor  # int64 (N,), flat index b * T + t of each computed step
    rows: Tensor | None = None
    ids: Tensor | None = None
    dense: Tensor | None = None

    @classmethod
    def make(cls, sets: ChunkedSets, valid: Tensor) -> FusedSets:
        """Restrict ``sets`` (over ``[B, T]``) to the valid steps."""
        flat_valid = valid.reshape(-1)
        steps = flat_valid.nonzero().squeeze(-1)
        if sets.dense is not None:
            return cls(steps, dense=sets.dense.reshape(-1, sets.dense.shape[-1]))
        if sets.csr is None:
            return cls(steps)
        assert sets.csr_rows is not None and sets.csr.ids is not None
        compact = torch.cumsum(flat_valid, 0) - 1  # (B * T,), row of each valid step
        keep = flat_valid.index_select(0, sets.csr_rows)
        rows = compact.index_select(0, sets.csr_rows[keep])
        return cls(steps, rows=rows, ids=sets.csr.ids[keep])

    @property
    def is_sparse(self) -> bool:
        return self.rows is not None

    def dense_tile(self, r0: int, r1: int, v0: int, v1: int) -> Tensor:
        """Bool ``(r1 - r0, v1 - v0)`` of a dense-mask tile."""
        assert self.dense is not None
        cols = torch.arange(v0, v1, device=self.dense.device)
        return self.dense[self.steps[r0:r1, None], cols[None, :]]


def _tiles(n: int, v: int, tile: int) -> tuple[int, int]:
    """``(n_t, n_v)``: steps and vocabulary rows of one tile of ``tile`` elements."""
    n_t = max(1, min(n, math.isqrt(tile)))
    return n_t, max(1, min(v, tile // n_t))


def _csr(rows: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR matrix from entries sorted by row (offsets by ``bincount``)."""
    offsets = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows.device)
    offsets[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(offsets, cols, vals, shape, check_invariants=False)


def _pair_dots(h: Tensor, w: Tensor, rows: Tensor, ids: Tensor) -> Tensor:
    """``h[rows[j]] . w[ids[j]]`` for every pair j (sorted by row), ``(nnz,)``, in h's dtype.

    One ``sampled_addmm`` (CSR pattern x dense x dense): on the loaded 2-core CPU here it
    was ~10x faster than gathering the rows with ``index_select`` and summing products.
    """
    if rows.numel() == 0:
        return h.new_zeros(0)
    pattern = _csr(rows, ids, h.new_zeros(rows.shape[0]), (h.shape[0], w.shape[0]))
    return torch.sparse.sampled_addmm(pattern, h, w.t(), beta=0.0).values()


def _pair_grads(
    h: Tensor,
    w: Tensor,
    onehot: tuple[Tensor, Tensor],
    pairs: tuple[Tensor, Tensor, Tensor] | None,
    need: tuple[bool, bool],
) -> tuple[Tensor | None, Tensor | None]:
    """``(C W, C^T h)`` for the sparse ``(N, V)`` matrix ``C = diag(c_y) onehot(y) + P``:
    ``onehot = (y, c_y)`` (one entry per step) and ``pairs = (r, k, c)`` the entries of
    ``P`` (sorted by r; a repeated pair adds up). ``P``'s products are CSR x dense
    matmuls (``index_add_`` of gathered rows was 6x slower here), the one-hot part one
    gather (``c_y w[y]``) and one ``index_add_`` (``c_y h`` into the rows y). New
    tensors, so the ``(V, H)`` weight gradient is allocated once."""
    y, c_y = onehot
    n, v = h.shape[0], w.shape[0]
    grad_h = grad_w = None
    if need[0]:
        grad_h = w.index_select(0, y).mul_(c_y[:, None])
        if pairs is not None:
            grad_h.add_(torch.sparse.mm(_csr(*pairs, (n, v)), w))
    if need[1]:
        if pairs is None:
            grad_w = h.new_zeros(v, h.shape[1])
        else:
            rows, ids, coef = pairs
            perm = torch.argsort(ids, stable=True)  # C^T: by token id, rows ascending within
            grad_w = _blocked_csr_mm(ids[perm], rows[perm], coef[perm], h, v)
            del perm
        grad_w.index_add_(0, y, h * c_y[:, None])
    return grad_h, grad_w


# Output elements of one block of _blocked_csr_mm (8 MiB of float32).
_BLOCK_ELEMENTS = 1 << 21


def _blocked_csr_mm(keys: Tensor, cols: Tensor, vals: Tensor, x: Tensor, m: int) -> Tensor:
    """``A x`` for the sparse ``(m, N)`` matrix ``A`` with entries ``(keys, cols, vals)``
    sorted by key, as a new ``(m, H)`` tensor, a block of rows at a time.

    One CSR x dense matmul over all m rows allocates its ``(m, H)`` result twice on CPU
    (``addmm`` into a temporary, then the copy): for the weight gradient that is a
    second ``(V, H)`` float32, the largest buffer of the backward. Blocks of
    ``_BLOCK_ELEMENTS // H`` rows bound the temporary instead.
    """
    out = x.new_zeros(m, x.shape[1])
    offsets = torch.zeros(m + 1, dtype=torch.int64, device=x.device)
    offsets[1:] = torch.cumsum(torch.bincount(keys, minlength=m), 0)
    block = max(1, _BLOCK_ELEMENTS // max(1, x.shape[1]))
    starts = [*range(0, m, block), m]
    bounds = offsets[starts].tolist()
    for i, r0 in enumerate(starts[:-1]):
        r1, a, b = starts[i + 1], bounds[i], bounds[i + 1]
        if a == b:
            continue
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            part = torch.sparse_csr_tensor(
                offsets[r0 : r1 + 1] - a,
                cols[a:b],
                vals[a:b],
                (r1 - r0, x.shape[0]),
                check_invariants=False,
            )
        out[r0:r1] = torch.sparse.mm(part, x)
    return out


def _segment_lse(vals: Tensor, rows: Tensor, n: int) -> Tensor:
    """logsumexp of ``vals`` grouped by ``rows`` into ``(n,)`` (empty group: -inf)."""
    m = torch.full((n,), -math.inf, dtype=vals.dtype, device=vals.device)
    m = m.scatter_reduce(0, rows, vals, reduce="amax", include_self=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.zeros_like(m).index_add_(0, rows, torch.exp(vals - m.index_select(0, rows)))
    return m + torch.log(s)


def _fold(m: Tensor, s: Tensor, z: Tensor) -> None:
    """Online logsumexp: fold the rows of tile ``z`` into ``(m, s)``; ``z`` is destroyed."""
    new_m = torch.maximum(m, z.amax(-1))
    safe = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
    s.mul_(torch.exp(m - safe))
    s.add_(z.sub_(safe.unsqueeze(-1)).exp_().sum(-1))
    m.copy_(safe)


def _project(buf: Tensor, hb: Tensor, w: Tensor, v0: int, v1: int, inv_t: float) -> Tensor:
    """``u = hb W[v0:v1]^T / T`` into the flat buffer, as a contiguous ``(n, v1 - v0)``."""
    z = buf[: hb.shape[0] * (v1 - v0)].view(hb.shape[0], v1 - v0)
    torch.mm(hb, w[v0:v1].to(hb.dtype).t(), out=z)
    return z if inv_t == 1.0 else z.mul_(inv_t)


def _dense_lse(
    h: Tensor, w: Tensor, sets: FusedSets, inv_t: float, tile: int, cdt: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """``logsumexp_V u`` and, for dense-mask sets, ``logsumexp_S u``; ``(N,)`` each."""
    n, v = h.shape[0], w.shape[0]
    n_t, n_v = _tiles(n, v, tile)
    buf = torch.empty(n_t * n_v, dtype=cdt, device=h.device)
    lse_f = torch.empty(n, dtype=cdt, device=h.device)
    lse_s = torch.empty_like(lse_f) if sets.dense is not None else None
    for r0 in range(0, n, n_t):
        r1 = min(r0 + n_t, n)
        hb = h[r0:r1].to(cdt)
        m, s = torch.full((r1 - r0,), -math.inf, dtype=cdt, device=h.device), hb.new_zeros(r1 - r0)
        ms, ss = m.clone(), s.clone()
        for v0 in range(0, v, n_v):
            v1 = min(v0 + n_v, v)
            z = _project(buf, hb, w, v0, v1, inv_t)
            if lse_s is not None:
                _fold(ms, ss, z.masked_fill(~sets.dense_tile(r0, r1, v0, v1), -math.inf))
            _fold(m, s, z)
        lse_f[r0:r1] = m + torch.log(s)
        if lse_s is not None:
            lse_s[r0:r1] = ms + torch.log(ss)
    return lse_f, lse_s


def _dense_grad(
    grads: tuple[Tensor | None, Tensor | None],
    h: Tensor,
    w: Tensor,
    sets: FusedSets,
    coefs: tuple[Tensor | None, Tensor | None],
    lses: tuple[Tensor, Tensor],
    inv_t: float,
    tile: int,
) -> None:
    """Add the dense part ``G = -c_p p - c_m pi_S 1[S]`` (dense masks) of ``dL/dz``, tile
    by tile: ``grad_h += G W``, ``grad_w += G^T h``."""
    grad_h, grad_w = grads
    c_p, c_s = coefs  # (N,) each or None: coefficient of p, of pi_S on a dense mask
    lse_f, lse_s = lses
    n, v = h.shape[0], w.shape[0]
    cdt = lse_f.dtype
    n_t, n_v = _tiles(n, v, tile)
    buf = torch.empty(n_t * n_v, dtype=cdt, device=h.device)
    for r0 in range(0, n, n_t):
        r1 = min(r0 + n_t, n)
        hb = h[r0:r1].to(cdt)
        for v0 in range(0, v, n_v):
            v1 = min(v0 + n_v, v)
            z = _project(buf, hb, w, v0, v1, inv_t)
            pi_s = None
            if c_s is not None:  # before z is overwritten
                pi_s = (z - lse_s[r0:r1, None]).exp_().mul_(-c_s[r0:r1, None])
                pi_s.masked_fill_(~sets.dense_tile(r0, r1, v0, v1), 0.0)
            if c_p is not None:
                z.sub_(lse_f[r0:r1, None]).exp_().mul_(-c_p[r0:r1, None])
            else:
                z.zero_()
            if pi_s is not None:
                z.add_(pi_s)
            if grad_h is not None:
                grad_h[r0:r1].addmm_(z, w[v0:v1].to(cdt))
            if grad_w is not None:
                grad_w[v0:v1].addmm_(z.t(), hb)


def _no_autocast(device: torch.device) -> torch.autocast:
    """Autocast off: the math stays in the compute dtype under a caller's mixed precision
    (an ``mm`` under ``torch.autocast`` would otherwise run in bf16 / fp16)."""
    return torch.autocast(device_type=device.type, enabled=False)


def _to_steps(x: Tensor, steps: Tensor, shape: tuple[int, int]) -> Tensor:
    """Scatter the ``(N,)`` values of the computed steps into a zero ``[B, T]``."""
    out = torch.zeros(shape[0] * shape[1], dtype=x.dtype, device=x.device)
    return out.index_copy_(0, steps, x).view(shape)


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype`` (no copy when it already is)."""
    return x if x.dtype == dtype else x.to(dtype)


def _compact(hidden: Tensor, steps: Tensor) -> Tensor:
    """The hidden states of the computed steps, ``(N, H)`` in their own dtype."""
    return hidden.detach().reshape(-1, hidden.shape[-1]).index_select(0, steps)


class _FusedPrunedLogprob(torch.autograd.Function):
    """``(log pi_S(y), log p(y), log Z_S)``, each ``[B, T]``, from ``hidden`` ``[B, T, H]``
    and ``weight`` ``(V, H)``; logits recomputed tile by tile in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        tokens: Tensor,
        sets: FusedSets,
        inv_t: float,
        ok_m: Tensor,
        with_full: bool,
        tile: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        shape = (hidden.shape[0], hidden.shape[1])
        cdt = compute_dtype(hidden.dtype)
        steps, n = sets.steps, sets.steps.shape[0]
        w = _as(weight.detach(), cdt)
        with torch.no_grad(), _no_autocast(hidden.device):
            h = _as(_compact(hidden, steps), cdt)
            y = tokens.reshape(-1).index_select(0, steps)
            u_y = _pair_dots(h, w, torch.arange(n, device=h.device), y) * inv_t
            lse_f = torch.full((n,), math.nan, dtype=cdt, device=h.device)
            lse_s: Tensor | None = None
            u_s = None
            if with_full or not sets.is_sparse:
                lse_f, lse_s = _dense_lse(h, w, sets, inv_t, tile, cdt)
            if sets.rows is not None and sets.ids is not None:
                u_s = _pair_dots(h, w, sets.rows, sets.ids) * inv_t  # (nnz,)
                lse_s = _segment_lse(u_s, sets.rows, n)
            elif lse_s is None:  # full sets: S = V
                lse_s = lse_f
        ok = ok_m.reshape(-1).index_select(0, steps)
        zero = torch.zeros_like(u_y)
        masked = _to_steps(torch.where(ok, u_y - lse_s, zero), steps, shape)
        full = _to_steps(u_y - lse_f, steps, shape)
        log_z = _to_steps(torch.where(ok, lse_s - lse_f, zero), steps, shape)
        ctx.save_for_backward(hidden, weight, y, ok, lse_s, lse_f, u_s)
        ctx.sets, ctx.inv_t, ctx.tile = sets, inv_t, tile
        ctx.mark_non_differentiable(log_z)
        ctx.set_materialize_grads(False)
        return masked, full, log_z

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_masked: Tensor | None, g_full: Tensor | None, _g_logz: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        with _no_autocast(ctx.saved_tensors[0].device):
            return _FusedPrunedLogprob._backward(ctx, g_masked, g_full)

    @staticmethod
    def _backward(
        ctx: Any, g_masked: Tensor | None, g_full: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        hidden, weight, y, ok, lse_s, lse_f, u_s = ctx.saved_tensors
        sets: FusedSets = ctx.sets
        inv_t: float = ctx.inv_t
        steps, n, cdt = sets.steps, sets.steps.shape[0], lse_s.dtype
        need_h, need_w = ctx.needs_input_grad[:2]
        h, w = _as(_compact(hidden, steps), cdt), _as(weight.detach(), cdt)
        c_m = c_f = None  # per-step coefficients, 1/T folded in
        if g_masked is not None:
            c_m = torch.where(ok, g_masked.reshape(-1).index_select(0, steps).to(cdt), 0.0) * inv_t
        if g_full is not None:
            c_f = g_full.reshape(-1).index_select(0, steps).to(cdt) * inv_t
        zero = torch.zeros(n, dtype=cdt, device=h.device)
        c_y = (zero if c_m is None else c_m) + (zero if c_f is None else c_f)
        pairs = None  # -c_m pi_S(k) at the CSR pairs (r, k)
        if sets.rows is not None and sets.ids is not None and c_m is not None:
            coef = torch.exp(u_s - lse_s.index_select(0, sets.rows))  # pi_S, (nnz,)
            pairs = (sets.rows, sets.ids, coef.mul_(-c_m.index_select(0, sets.rows)))
        grad_h, grad_w = _pair_grads(h, w, (y, c_y), pairs, (need_h, need_w))
        del pairs
        full_sets = not sets.is_sparse and sets.dense is None
        c_p = c_f if not (full_sets and c_m is not None) else c_m + (zero if c_f is None else c_f)
        c_s = c_m if sets.dense is not None else None
        if c_p is not None or c_s is not None:
            coefs = (c_p, c_s)
            _dense_grad((grad_h, grad_w), h, w, sets, coefs, (lse_f, lse_s), inv_t, ctx.tile)
        grad_hidden = grad_weight = None
        if grad_h is not None:
            flat = hidden.new_zeros(hidden.shape[0] * hidden.shape[1], h.shape[1])
            grad_hidden = flat.index_copy_(0, steps, grad_h.to(hidden.dtype)).view(hidden.shape)
        if grad_w is not None:
            grad_weight = grad_w.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def fused_pruned_logprobs(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    sets: FusedSets,
    inv_t: float,
    ok_m: Tensor,
    with_full: bool,
    tile: int = DEFAULT_TILE_ELEMENTS,
) -> tuple[Tensor, Tensor, Tensor]:
    """Apply the autograd function: ``(log pi_S(y), log p(y), log Z_S)``, each ``[B, T]``.

    ``log p(y)`` is NaN without ``with_full`` for CSR sets (the dense tiles are skipped).
    """
    out = _FusedPrunedLogprob.apply(hidden, weight, tokens, sets, inv_t, ok_m, with_full, tile)
    return out[0], out[1], out[2]
