"""Chunked, memory-lean log pi_S(y) with an analytic backward (internal).

The public entry point is :func:`dvp_client.train.objective.pruned_logprobs`. This
module holds the per-chunk set algebra and the ``autograd.Function``.

Per step, with scaled logits ``u = z / T`` (``T = 0`` -> ``u = z``), safe set S
and sampled token y::

    log pi_S(y) = u_y - logsumexp_{k in S} u_k
    log p(y)    = u_y - logsumexp_{k in V} u_k
    d log pi_S(y) / d z_k = (1[k = y] - pi_S(k) 1[k in S]) / T
    d log p(y)    / d z_k = (1[k = y] - p(k)) / T

Naive equivalent (what this replaces)::

    u.masked_fill(~mask, -inf).log_softmax(-1).gather(-1, y[..., None])

which keeps a full-size float32 log-softmax alive for backward and materialises
two more full-size tensors in backward. Here forward saves only the inputs (by
reference), two ``[B, T]`` normalisers and, for CSR sets, the ``|S|`` scaled
logits of each step; backward writes the gradient straight into its output.

With CSR sets (the usual case: |S| is tens to hundreds of tokens) the masked
part is sparse in both directions: forward gathers the ``|S|`` logits of each
step, backward zero-fills the gradient and scatters
``g (1[k = y] - pi_S(k)) / T`` at those ids, one batch row at a time, so the
number of tensor ops does not grow with the sequence. The dense work (``log p(y)``
and ``log Z_S`` need ``logsumexp`` over V; full or dense-mask sets need a dense
``pi_S``) runs over chunks of the sequence, each a ``(n, V)`` view of the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .tensors import SafeSets

__all__ = ["ChunkedSets", "pruned_logprob_function"]


# A dense mask with fewer than 1/8 of its entries set is converted to CSR.
_SPARSE_FRACTION = 8


@dataclass(frozen=True)
class ChunkedSets:
    """Safe sets of a ``[B, T]`` batch in one of three forms.

    Exactly one of: ``csr`` (CSR :class:`SafeSets`, with ``csr_rows`` its flat step
    index per id, from :meth:`SafeSets.to_index`), ``dense`` (bool ``[B, T, V]``), or
    neither (every set is the whole vocabulary).

    Sparse indexing uses flat ``index_select`` / ``index_add_`` rather than 2-d
    advanced indexing: on a busy 2-core CPU the latter was 10-80x slower (OpenMP
    threads waiting on each other for a 16k-element gather).
    """

    csr: SafeSets | None = None
    csr_rows: Tensor | None = None
    dense: Tensor | None = None

    @classmethod
    def from_csr(cls, sets: SafeSets) -> ChunkedSets:
        if sets.is_full:
            return cls()
        return cls(csr=sets, csr_rows=sets.to_index()[0])

    @classmethod
    def from_mask(cls, mask: Tensor) -> ChunkedSets:
        """Dense bool ``[B, T, V]``: converted to CSR when the sets are small (the sparse
        path then skips every dense pass over pi_S), kept dense otherwise."""
        if int(torch.count_nonzero(mask)) * _SPARSE_FRACTION < mask.numel():  # no int64 copy
            return cls.from_csr(SafeSets.from_mask(mask))
        return cls(dense=mask)

    @property
    def is_sparse(self) -> bool:
        return self.csr is not None

    def row_flats(self, width: int, vocab: int) -> list[Tensor]:
        """For each batch row b, flat indices ``t * V + id`` of its ids into the row's
        ``(T, V)`` logits (CSR rows are sorted, so row b's ids are one slice)."""
        csr = self.csr
        assert csr is not None and csr.offsets is not None and csr.ids is not None
        assert self.csr_rows is not None
        bounds = csr.offsets[::width].tolist()  # (B + 1,) offsets of each batch row
        out = []
        for b in range(len(bounds) - 1):
            lo, hi = bounds[b], bounds[b + 1]
            out.append((self.csr_rows[lo:hi] - b * width) * vocab + csr.ids[lo:hi])
        return out

    def contains_all(self, tokens: Tensor) -> Tensor:
        """Whether ``tokens[b, t]`` is in its set, bool ``[B, T]`` (CSR sets)."""
        csr = self.csr
        assert csr is not None and csr.ids is not None and self.csr_rows is not None
        flat_y = tokens.reshape(-1)
        hit = (csr.ids == flat_y.index_select(0, self.csr_rows)).long()
        count = torch.zeros_like(flat_y).index_add_(0, self.csr_rows, hit)
        return (count > 0).view(tokens.shape)

    def chunk(self, b: int, t0: int, t1: int, width: int) -> _Chunk:
        """The sets of steps ``(b, t0:t1)``; ``width`` is T (to flatten ``(b, t)``)."""
        if self.dense is not None:
            return _Chunk(t1 - t0, dense=self.dense[b, t0:t1])
        csr = self.csr
        if csr is not None and csr.offsets is not None and csr.ids is not None:
            assert self.csr_rows is not None
            r0 = b * width + t0
            lo, hi = int(csr.offsets[r0]), int(csr.offsets[b * width + t1])
            return _Chunk(t1 - t0, rows=self.csr_rows[lo:hi] - r0, cols=csr.ids[lo:hi])
        return _Chunk(t1 - t0)


@dataclass(frozen=True)
class _Chunk:
    """The sets of ``n`` consecutive steps: full, dense ``(n, V)`` or sparse ``(rows, cols)``."""

    n: int
    dense: Tensor | None = None
    rows: Tensor | None = None  # int64 (nnz,), local row of each id
    cols: Tensor | None = None  # int64 (nnz,), token ids

    def flat(self, vocab: int) -> Tensor:
        """Flat indices ``row * V + col`` into a contiguous ``(n, V)`` chunk."""
        assert self.rows is not None and self.cols is not None
        return self.rows * vocab + self.cols

    @property
    def is_full(self) -> bool:
        return self.dense is None and self.rows is None

    def logsumexp(self, z: Tensor, inv_t: float, lse_full: Tensor) -> Tensor:
        """``logsumexp_{k in S} z_k / T`` per row, ``(n,)``, for dense or full sets
        (``lse_full``, the same over V, is returned as is). CSR sets are done per batch
        row in :class:`_PrunedLogprob`."""
        assert self.rows is None, "CSR sets take the whole-row sparse path"
        if self.dense is not None:
            return lse_rows(scaled(z, inv_t).masked_fill(~self.dense, -math.inf), 1.0)
        return lse_full

    def sizes(self, vocab: int, device: torch.device) -> Tensor:
        """``|S|`` per row, int64 ``(n,)``."""
        if self.dense is not None:
            return self.dense.sum(-1)
        if self.rows is None:
            return torch.full((self.n,), vocab, dtype=torch.int64, device=device)
        return torch.bincount(self.rows, minlength=self.n)

    def intersection_sizes(self, other: Tensor) -> Tensor:
        """``|S ∩ S'|`` per row for a dense ``other`` mask ``(n, V)``; int64 ``(n,)``."""
        if self.dense is not None:
            return (self.dense & other).sum(-1)
        if self.rows is None:
            return other.sum(-1)
        hit = take(other, self.flat(other.shape[-1])).long()
        return torch.zeros(self.n, dtype=torch.int64, device=other.device).index_add_(
            0, self.rows, hit
        )


def take(x: Tensor, flat: Tensor) -> Tensor:
    """``x.reshape(-1)[flat]`` for a row-contiguous ``(n, V)`` chunk, without a copy of x."""
    return x.reshape(-1).index_select(0, flat)


def _segment_logsumexp(vals: Tensor, rows: Tensor, n: int) -> Tensor:
    """logsumexp of ``vals`` grouped by ``rows`` (``(nnz,)`` each) into ``(n,)``."""
    m = torch.full((n,), -math.inf, dtype=vals.dtype, device=vals.device)
    m = m.scatter_reduce(0, rows, vals, reduce="amax", include_self=True)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.zeros_like(m).index_add_(0, rows, torch.exp(vals - m_safe.index_select(0, rows)))
    return m_safe + torch.log(s)  # empty row: 0 + log 0 = -inf


def lse_rows(z: Tensor, inv_t: float) -> Tensor:
    """``logsumexp_k z_k / T`` over the last dim of ``(n, V)``, in the compute dtype.

    Fused as ``max``, one ``(z - max) / T`` pass into a single temporary, ``exp_``,
    ``sum``: ``torch.logsumexp`` gives the same value but is much slower on CPU
    (measured here: 40 ms vs 2 ms for [85, 49152] float32).
    """
    cdt = compute_dtype(z.dtype)
    m = z.amax(-1, keepdim=True).to(cdt) * inv_t  # (n, 1); max(z / T) = max(z) / T for T > 0
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf row -> -inf below
    tmp = torch.empty(z.shape, dtype=cdt, device=z.device)
    torch.add(-m, z, alpha=inv_t, out=tmp)  # z / T - max, (n, V)
    return tmp.exp_().sum(-1).log_().add_(m.squeeze(-1))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); every other float dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scaled(z: Tensor, inv_t: float) -> Tensor:
    """``u = z / T`` in the compute dtype; no copy for float32 logits at T = 1."""
    u = z.to(compute_dtype(z.dtype))
    return u if inv_t == 1.0 else u * inv_t


def chunk_bounds(b: int, t: int, chunk: int) -> list[tuple[int, int, int]]:
    """``(b, t0, t1)`` for every chunk of at most ``chunk`` steps within a row."""
    return [(i, t0, min(t0 + chunk, t)) for i in range(b) for t0 in range(0, t, chunk)]


def _row(logits: Tensor, b: int) -> Tensor:
    """Batch row b of ``[B, T, V]`` logits as a flat ``(T * V,)`` view (a copy only if
    its rows are not contiguous, which a completion slice of model logits never is)."""
    return logits[b].reshape(-1)


class _PrunedLogprob(torch.autograd.Function):
    """``(log pi_S(y), log p(y), log Z_S)``, each ``[B, T]``, from logits ``[B, T, V]``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: Tensor,
        tokens: Tensor,
        sets: ChunkedSets,
        inv_t: float,
        valid: Tensor,
        in_set: Tensor,
        chunk: int,
        with_full: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        b, t, v = logits.shape
        cdt = compute_dtype(logits.dtype)
        lse_s = torch.zeros(b, t, dtype=cdt, device=logits.device)
        lse_f = torch.full_like(lse_s, math.nan)  # stays NaN without with_full (CSR sets)
        u_s = flats = None
        with torch.no_grad():
            if with_full or not sets.is_sparse:  # the dense passes, chunk by chunk
                for i, t0, t1 in chunk_bounds(b, t, chunk):
                    z = logits[i, t0:t1]  # (n, V) view
                    lse_f[i, t0:t1] = lse_rows(z, inv_t)
                    ch = sets.chunk(i, t0, t1, t)
                    if not sets.is_sparse:
                        lse_s[i, t0:t1] = ch.logsumexp(z, inv_t, lse_f[i, t0:t1])
            if sets.is_sparse:  # gather the |S| logits of every step, row by row
                assert sets.csr_rows is not None
                flats = sets.row_flats(t, v)
                u_s = torch.cat([_row(logits, i).index_select(0, f) for i, f in enumerate(flats)])
                u_s = u_s.to(cdt) * inv_t  # (nnz,)
                lse_s = _segment_logsumexp(u_s, sets.csr_rows, b * t).view(b, t)
            u_y = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).to(cdt) * inv_t
        ok_m = valid & in_set
        zero = torch.zeros_like(u_y)
        masked = torch.where(ok_m, u_y - lse_s, zero)
        full = torch.where(valid, u_y - lse_f, zero)
        log_z = torch.where(ok_m, lse_s - lse_f, zero)
        ctx.save_for_backward(logits, tokens, valid, ok_m, lse_s, lse_f, u_s)
        ctx.sets, ctx.inv_t, ctx.chunk, ctx.flats = sets, inv_t, chunk, flats
        ctx.mark_non_differentiable(log_z)
        ctx.set_materialize_grads(False)
        return masked, full, log_z

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_masked: Tensor | None, g_full: Tensor | None, _g_logz: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        logits, tokens, valid, ok_m, lse_s, lse_f, u_s = ctx.saved_tensors
        sets: ChunkedSets = ctx.sets
        inv_t: float = ctx.inv_t
        cdt = compute_dtype(logits.dtype)
        # Per-step coefficients with 1/T folded in: c_m for log pi_S, c_f for log p.
        c_m = None if g_masked is None else torch.where(ok_m, g_masked.to(cdt), 0.0) * inv_t
        c_f = None if g_full is None else torch.where(valid, g_full.to(cdt), 0.0) * inv_t
        dense_m = c_m if not sets.is_sparse else None  # full / dense-mask sets: dense pi_S
        if c_f is not None or dense_m is not None:
            grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
            _dense_grad(grad, logits, tokens, sets, inv_t, c_f, dense_m, lse_s, lse_f, ctx.chunk)
        else:
            grad = torch.zeros_like(logits, memory_format=torch.contiguous_format)
        if sets.is_sparse and c_m is not None:
            assert sets.csr is not None and sets.csr.ids is not None and sets.csr_rows is not None
            rows, ids = sets.csr_rows, sets.csr.ids
            is_y = (ids == tokens.reshape(-1).index_select(0, rows)).to(cdt)
            pi_s = torch.exp(u_s - lse_s.reshape(-1).index_select(0, rows))
            vals = (is_y - pi_s).mul_(c_m.reshape(-1).index_select(0, rows))  # (nnz,) fp32
            vals = vals.to(grad.dtype)
            lo = 0
            for i, f in enumerate(ctx.flats):
                grad[i].view(-1).index_add_(0, f, vals[lo : lo + f.numel()])
                lo += f.numel()
        return grad, None, None, None, None, None, None, None


def _dense_grad(
    grad: Tensor,
    logits: Tensor,
    tokens: Tensor,
    sets: ChunkedSets,
    inv_t: float,
    c_f: Tensor | None,
    c_m: Tensor | None,
    lse_s: Tensor,
    lse_f: Tensor,
    chunk: int,
) -> None:
    """Write the dense part of the gradient into ``grad``, chunk by chunk, in the compute
    dtype: ``c_f (1[k=y] - p)`` plus, for full / dense-mask sets, ``c_m (1[k=y] - pi_S)``
    (coefficients already divided by T)."""
    b, t, _ = logits.shape
    cdt = compute_dtype(logits.dtype)
    for i, t0, t1 in chunk_bounds(b, t, chunk):
        out = grad[i, t0:t1]
        work = out if out.dtype == cdt else torch.empty(out.shape, dtype=cdt, device=out.device)
        _chunk_grad(
            work,
            logits[i, t0:t1],
            tokens[i, t0:t1],
            sets.chunk(i, t0, t1, t),
            inv_t,
            None if c_m is None else c_m[i, t0:t1],
            None if c_f is None else c_f[i, t0:t1],
            lse_s[i, t0:t1],
            lse_f[i, t0:t1],
        )
        if work is not out:
            out.copy_(work)


def _chunk_grad(
    work: Tensor,
    z: Tensor,
    y: Tensor,
    sets: _Chunk,
    inv_t: float,
    c_m: Tensor | None,
    c_f: Tensor | None,
    lse_s: Tensor,
    lse_f: Tensor,
) -> None:
    """``work`` ``(n, V)`` = ``c_f (1[k=y] - p) + c_m (1[k=y] - pi_S 1[S])`` for full or
    dense-mask sets (``c_m`` None for CSR sets, whose part is scattered afterwards).

    One fused ``z / T - lse`` pass plus ``exp_`` per dense term.
    """
    n = work.shape[0]
    zero = torch.zeros(n, dtype=work.dtype, device=work.device)
    cm = zero if c_m is None else c_m
    cf = zero if c_f is None else c_f
    c_p = cf + cm if sets.is_full else cf  # S = V: pi_S = p shares the exp pass
    if c_f is not None or (sets.is_full and c_m is not None):
        torch.add(-lse_f.unsqueeze(-1), z, alpha=inv_t, out=work)  # log p, (n, V)
        work.exp_().mul_(-c_p.unsqueeze(-1))
    else:
        work.zero_()
    if c_m is not None and sets.dense is not None:
        pi_s = torch.add(-lse_s.unsqueeze(-1), z, alpha=inv_t).exp_()  # (n, V)
        work.sub_(pi_s.masked_fill_(~sets.dense, 0.0).mul_(cm.unsqueeze(-1)))
    work[torch.arange(n, device=work.device), y] += cm + cf


def pruned_logprob_function(
    logits: Tensor,
    tokens: Tensor,
    sets: ChunkedSets,
    inv_t: float,
    valid: Tensor,
    in_set: Tensor,
    chunk: int,
    with_full: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Apply the autograd function (typed wrapper around ``_PrunedLogprob.apply``).

    Returns ``(log pi_S(y), log p(y), log Z_S)``; without ``with_full`` the last two
    are NaN for CSR sets (their dense pass is then skipped).
    """
    out = _PrunedLogprob.apply(logits, tokens, sets, inv_t, valid, in_set, chunk, with_full)
    return out[0], out[1], out[2]
