"""Chunked, memory-lean log pi_S(y) with an analytic backward (internal).

The public entry point is :func:`dvp_client.objective.pruned_logprobs`. This
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
two more full-size tensors in backward. Here the forward runs over chunks of
the sequence and saves only the inputs (by reference) and two ``[B, T]``
normalisers; backward recomputes what it needs chunk by chunk and writes the
gradient straight into its output. With CSR sets the masked part of backward is
sparse: ``-g * pi_S(k)`` is scattered at the ``|S|`` ids of each step only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .tensors import SafeSets

__all__ = ["ChunkedSets", "pruned_logprob_function"]


@dataclass(frozen=True)
class ChunkedSets:
    """Safe sets of a ``[B, T]`` batch in one of three forms.

    Exactly one of: ``csr`` (CSR :class:`SafeSets`), ``dense`` (bool ``[B, T, V]``),
    or neither (every set is the whole vocabulary).
    """

    csr: SafeSets | None = None
    dense: Tensor | None = None

    def chunk(self, b: int, t0: int, t1: int, width: int) -> _Chunk:
        """The sets of steps ``(b, t0:t1)``; ``width`` is T (to flatten ``(b, t)``)."""
        if self.dense is not None:
            return _Chunk(t1 - t0, dense=self.dense[b, t0:t1])
        if self.csr is not None and self.csr.offsets is not None and self.csr.ids is not None:
            r0, r1 = b * width + t0, b * width + t1
            off = self.csr.offsets[r0 : r1 + 1]
            lo, hi = int(off[0]), int(off[-1])
            rows = torch.repeat_interleave(
                torch.arange(t1 - t0, device=off.device), torch.diff(off), output_size=hi - lo
            )
            return _Chunk(t1 - t0, rows=rows, cols=self.csr.ids[lo:hi])
        return _Chunk(t1 - t0)


@dataclass(frozen=True)
class _Chunk:
    """The sets of ``n`` consecutive steps: full, dense ``(n, V)`` or sparse ``(rows, cols)``."""

    n: int
    dense: Tensor | None = None
    rows: Tensor | None = None
    cols: Tensor | None = None

    def logsumexp(self, u: Tensor, lse_full: Tensor) -> Tensor:
        """``logsumexp_{k in S} u_k`` per row, ``(n,)`` (``-inf`` for an empty set)."""
        if self.dense is not None:
            return torch.logsumexp(u.masked_fill(~self.dense, -math.inf), dim=-1)
        if self.rows is None or self.cols is None:
            return lse_full
        vals = u[self.rows, self.cols]  # (nnz,)
        return _segment_logsumexp(vals, self.rows, self.n)

    def contains(self, y: Tensor) -> Tensor:
        """Whether ``y[i]`` is in set i, bool ``(n,)``."""
        if self.dense is not None:
            return self.dense.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        if self.rows is None or self.cols is None:
            return torch.ones_like(y, dtype=torch.bool)
        hit = (self.cols == y[self.rows]).long()
        return torch.zeros_like(y).index_add_(0, self.rows, hit) > 0

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
        if self.rows is None or self.cols is None:
            return other.sum(-1)
        hit = other[self.rows, self.cols].long()
        return torch.zeros(self.n, dtype=torch.int64, device=other.device).index_add_(
            0, self.rows, hit
        )


def _segment_logsumexp(vals: Tensor, rows: Tensor, n: int) -> Tensor:
    """logsumexp of ``vals`` grouped by ``rows`` (``(nnz,)`` each) into ``(n,)``."""
    m = torch.full((n,), -math.inf, dtype=vals.dtype, device=vals.device)
    m = m.scatter_reduce(0, rows, vals, reduce="amax", include_self=True)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.zeros_like(m).index_add_(0, rows, torch.exp(vals - m_safe[rows]))
    return m_safe + torch.log(s)  # empty row: 0 + log 0 = -inf


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
    ) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = logits.shape
        cdt = compute_dtype(logits.dtype)
        lse_s = torch.zeros(b, t, dtype=cdt, device=logits.device)
        lse_f = torch.zeros_like(lse_s)
        u_y = torch.zeros_like(lse_s)
        with torch.no_grad():
            for i, t0, t1 in chunk_bounds(b, t, chunk):
                u = scaled(logits[i, t0:t1], inv_t)  # (n, V)
                lse_f[i, t0:t1] = torch.logsumexp(u, dim=-1)
                lse_s[i, t0:t1] = sets.chunk(i, t0, t1, t).logsumexp(u, lse_f[i, t0:t1])
                u_y[i, t0:t1] = u.gather(-1, tokens[i, t0:t1].unsqueeze(-1)).squeeze(-1)
        ok_m = valid & in_set
        zero = torch.zeros_like(u_y)
        masked = torch.where(ok_m, u_y - lse_s, zero)
        full = torch.where(valid, u_y - lse_f, zero)
        log_z = torch.where(ok_m, lse_s - lse_f, zero)
        ctx.save_for_backward(logits, tokens, valid, ok_m, lse_s, lse_f)
        ctx.sets, ctx.inv_t, ctx.chunk = sets, inv_t, chunk
        ctx.mark_non_differentiable(log_z)
        ctx.set_materialize_grads(False)
        return masked, full, log_z

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_masked: Tensor | None, g_full: Tensor | None, _g_logz: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        logits, tokens, valid, ok_m, lse_s, lse_f = ctx.saved_tensors
        sets: ChunkedSets = ctx.sets
        inv_t: float = ctx.inv_t
        b, t, _ = logits.shape
        cdt = compute_dtype(logits.dtype)
        g_m = None if g_masked is None else torch.where(ok_m, g_masked.to(cdt), 0.0)
        g_f = None if g_full is None else torch.where(valid, g_full.to(cdt), 0.0)
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        for i, t0, t1 in chunk_bounds(b, t, ctx.chunk):
            sl = (i, slice(t0, t1))
            out = grad[sl]
            work = out if out.dtype == cdt else torch.empty(out.shape, dtype=cdt, device=out.device)
            _chunk_grad(
                work,
                logits[sl],
                tokens[sl],
                sets.chunk(i, t0, t1, t),
                inv_t,
                None if g_m is None else g_m[sl],
                None if g_f is None else g_f[sl],
                lse_s[sl],
                lse_f[sl],
            )
            if work is not out:
                out.copy_(work)
        return grad, None, None, None, None, None, None


def _chunk_grad(
    work: Tensor,
    z: Tensor,
    y: Tensor,
    sets: _Chunk,
    inv_t: float,
    g_m: Tensor | None,
    g_f: Tensor | None,
    lse_s: Tensor,
    lse_f: Tensor,
) -> None:
    """Write ``(g_m (1[k=y] - pi_S 1[S]) + g_f (1[k=y] - p)) / T`` into ``work`` ``(n, V)``."""
    n = work.shape[0]
    sparse = sets.rows is not None and sets.cols is not None
    dense_m = g_m is not None and not sparse  # full or dense-mask sets need a dense pi_S
    if g_f is not None or dense_m:
        u = scaled(z, inv_t)
        # -(g_f p + g_m pi_S) where S = V (full sets) shares the one exp pass.
        coef = torch.zeros(n, dtype=work.dtype, device=work.device)
        if g_f is not None:
            coef = coef + g_f
        if dense_m and sets.dense is None and g_m is not None:
            coef = coef + g_m  # full sets: pi_S = p
        torch.sub(u, lse_f.unsqueeze(-1), out=work).exp_().mul_(-coef.unsqueeze(-1))
        if dense_m and sets.dense is not None and g_m is not None:
            pi_s = torch.exp(u - lse_s.unsqueeze(-1)).masked_fill_(~sets.dense, 0.0)
            work.sub_(pi_s.mul_(g_m.unsqueeze(-1)))
    else:
        work.zero_()
    if sparse and g_m is not None:
        assert sets.rows is not None and sets.cols is not None
        u_s = z[sets.rows, sets.cols].to(work.dtype) * inv_t  # (nnz,) gathered, no dense copy
        vals = torch.exp(u_s - lse_s[sets.rows]) * g_m[sets.rows]
        work.index_put_((sets.rows, sets.cols), -vals, accumulate=True)
    coef_y = torch.zeros(n, dtype=work.dtype, device=work.device)
    if g_m is not None:
        coef_y = coef_y + g_m
    if g_f is not None:
        coef_y = coef_y + g_f
    work[torch.arange(n, device=work.device), y] += coef_y
    if inv_t != 1.0:
        work.mul_(inv_t)


def pruned_logprob_function(
    logits: Tensor,
    tokens: Tensor,
    sets: ChunkedSets,
    inv_t: float,
    valid: Tensor,
    in_set: Tensor,
    chunk: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Apply the autograd function (typed wrapper around ``_PrunedLogprob.apply``)."""
    out = _PrunedLogprob.apply(logits, tokens, sets, inv_t, valid, in_set, chunk)
    return out[0], out[1], out[2]
