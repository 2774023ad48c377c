"""The safe-vocabulary rule for min-p-only steps, with S held as id lists.

The same rule as :func:`dvp_client.train.rule.safe_vocab` (module docstring there) for
the case an RL rollout uses most: sampling (``T > 0``) pruned by ``min_p`` alone
(no ``top_k``, ``top_p = 1``). S is then ``{v : u_v - max u >= log rho}``, a few
hundred ids out of ~50k, and everything after the two full-vocabulary
normalisers can work on S alone: no ``(N, V)`` mask is summed, masked, searched
twice or scanned block by block for sampling. Full-vocabulary passes per step:
max, ``u - max`` (once, also the min-p test), one ``exp`` in place, one sum, one
compare and one ``nonzero``, against about twice that for the dense path.

Same results as the dense path: S is the same set (the same float32 comparison on
the same values, ``rule._min_p_keep``); the sampling weights are the same float32
``exp(u - max u)`` values, accumulated in float64 as there, so a seeded draw picks
the same token unless its uniform falls within float64 rounding (~1e-16 of the
mass) of a boundary; the log-probs and log-mass agree to float32 rounding
(``log Z_S`` sums S in float64 here). Tested against the dense path and a float64
reference in tests/test_rule_sparse.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .rule import (
    GREEDY_EPS,
    RuleParams,
    Scalar,
    _LogMass,
    _min_p_keep,
    _scale,
    _search_last_positive,
    _uniforms,
)

__all__ = ["SparseSafeVocab", "sparse_applies", "sparse_safe_vocab"]


def sparse_applies(
    temperature: Tensor, min_p: Tensor, top_k: Tensor | None = None, top_p: Tensor | None = None
) -> bool:
    """Whether :func:`sparse_safe_vocab` can serve these per-row parameters ``(N,)``:
    every row samples (``T >= GREEDY_EPS``), prunes by min-p (``min_p > 0``: with 0, S
    is the whole vocabulary and the dense path is cheaper) and uses no top-k / top-p."""
    ok = bool((temperature >= GREEDY_EPS).all()) and bool((min_p > 0).all())
    if top_k is not None:
        ok = ok and not bool((top_k > 0).any())
    if top_p is not None:
        ok = ok and bool((top_p >= 1).all())
    return ok


@dataclass(frozen=True)
class SparseSafeVocab(_LogMass):
    """The rule applied to N min-p-only steps; S as ascending id lists.

    Attributes:
        scaled: float32 ``(N, V)`` scaled logits ``u = z / T``.
        shift: float32 ``(N,)``, ``max u`` per row.
        log_rho: float32 ``(N,)``, ``log min_p``.
        ids: int64 ``(M,)``, the ids of every row's S, row after row, ascending
            within a row (``M = sum |S|``).
        offsets: int64 ``(N + 1,)``: row i's ids are ``ids[offsets[i]:offsets[i+1]]``.
        weights: float32 ``(M,)``, unnormalised pi_S: ``exp(u - max u)`` on S.
        log_z_full: float32 ``(N,)``, ``logsumexp_V u``.
        log_z_safe: float32 ``(N,)``, ``logsumexp_S u``.
    """

    scaled: Tensor
    shift: Tensor
    log_rho: Tensor
    ids: Tensor
    offsets: Tensor
    weights: Tensor
    log_z_full: Tensor
    log_z_safe: Tensor

    @property
    def safe_sizes(self) -> Tensor:
        """``|S|`` per row, int64 ``(N,)``."""
        return self.offsets[1:] - self.offsets[:-1]

    def logprobs(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``(log p(y), log pi_S(y))`` of ``tokens`` (int64 ``(N,)``), float32 ``(N,)``
        each; the masked one is ``-inf`` where ``y`` is not in S."""
        if tokens.dtype != torch.int64:
            raise TypeError(f"tokens must be int64, got {tokens.dtype}")
        u_y = self.scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        in_s = (u_y - self.shift) >= self.log_rho  # the min-p test, as for S itself
        full = u_y - self.log_z_full
        masked = torch.where(in_s, u_y - self.log_z_safe, torch.full_like(u_y, -math.inf))
        return full, masked

    def padded(self) -> tuple[Tensor, Tensor]:
        """S row by row, right-padded to ``max |S|``: ids int64 ``(N, W)`` (padding 0)
        and float64 weights ``(N, W)`` (padding 0)."""
        sizes = self.safe_sizes
        n, width = sizes.shape[0], int(sizes.max()) if sizes.numel() else 0
        rows = torch.repeat_interleave(torch.arange(n), sizes)  # (M,)
        cols = torch.arange(self.ids.shape[0]) - self.offsets[:-1][rows]  # (M,)
        ids = torch.zeros((n, width), dtype=torch.int64)
        w = torch.zeros((n, width), dtype=torch.float64)
        ids[rows, cols] = self.ids
        w[rows, cols] = self.weights.double()
        return ids, w

    def sample(
        self, generators: torch.Generator | Sequence[torch.Generator] | None = None
    ) -> Tensor:
        """Draw one token per row from ``pi_S`` by inverse CDF; int64 ``(N,)``.

        Same draws as ``SafeVocab.sample``: one float64 uniform per row from its
        generator, the first id (ascending) whose float64 cumulative weight exceeds
        ``uniform * total``.
        """
        uni = _uniforms(self.offsets.shape[0] - 1, generators)
        ids, w = self.padded()
        cdf = torch.cumsum(w, dim=-1)  # (N, W)
        j = _search_last_positive(cdf, uni * cdf[:, -1])
        return ids.gather(-1, j.unsqueeze(-1)).squeeze(-1)


def _nonzero(mask: Tensor) -> tuple[Tensor, Tensor]:
    """``mask.nonzero(as_tuple=True)`` for a sparse bool ``(N, V)``: (rows, cols) int64,
    row-major and ascending. Scans 8 flags at a time (as int64 words) and expands
    only the words that hold one: ~8x fewer elements for a set of a few hundred."""
    n, v = mask.shape
    if v % 8 or not mask.is_contiguous():
        rows, cols = mask.nonzero(as_tuple=True)
        return rows, cols
    r, w = mask.view(torch.int64).nonzero(as_tuple=True)  # words with a set flag
    k, b = mask.view(n, v // 8, 8)[r, w].nonzero(as_tuple=True)  # (word, byte) within them
    return r[k], w[k] * 8 + b


def sparse_safe_vocab(
    logits: Tensor,
    *,
    temperature: Scalar | Tensor = 1.0,
    min_p: Scalar | Tensor = 0.0,
    params: RuleParams | None = None,
) -> SparseSafeVocab:
    """Apply the min-p-only rule to logits ``(N, V)`` (CPU, any float dtype).

    Args:
        logits: ``(N, V)`` raw logits of N steps.
        temperature, min_p: scalars or ``(N,)`` tensors.
        params: instead of those, ``RuleParams.make``'s output (a caller that
            decodes the same rows step after step validates them once).

    Raises:
        ValueError: bad shapes or values, or parameters :func:`sparse_applies`
            refuses (a greedy row, ``min_p = 0``, top-k, top-p): use
            ``rule.safe_vocab`` for those.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    if params is None:
        params = RuleParams.make(logits.shape[0], temperature=temperature, min_p=min_p)
    if params.temperature.shape != (logits.shape[0],):
        raise ValueError(
            f"params are for {params.temperature.shape[0]} rows, logits have {logits.shape[0]}"
        )
    if not sparse_applies(params.temperature, params.min_p, params.top_k, params.top_p):
        raise ValueError(
            "sparse_safe_vocab needs T >= 1e-5, min_p > 0, no top_k and top_p = 1 in every row"
        )
    u, _ = _scale(logits, params.temperature)
    shift = torch.amax(u, dim=-1, keepdim=True)  # (N, 1)
    e = u - shift  # (N, V): the min-p test's operand, then exp(u - max) in place
    rows, ids = _nonzero(_min_p_keep(e, params.min_p))
    e.exp_()
    log_z_full = shift.squeeze(-1) + torch.log(e.sum(dim=-1))
    weights = e[rows, ids]  # (M,) float32, the dense path's values
    n = u.shape[0]
    sizes = torch.bincount(rows, minlength=n)
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(sizes, dim=0, out=offsets[1:])
    z_safe = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, weights.double())
    log_z_safe = shift.squeeze(-1) + torch.log(z_safe).float()
    return SparseSafeVocab(
        scaled=u,
        shift=shift.squeeze(-1),
        log_rho=torch.log(params.min_p),
        ids=ids,
        offsets=offsets,
        weights=weights,
        log_z_full=log_z_full,
        log_z_safe=log_z_safe,
    )
