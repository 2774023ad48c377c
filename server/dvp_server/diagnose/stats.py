"""Statistics of ``dvp-diagnose``: |dlogp| binned by p, the bound's eps, rank correlation.

The claim under test (see the README): with engine logits ``z + delta``,
``|delta - c|_inf <= eps`` for some shift c, the log-prob error of token a obeys,
to first order in eps::

    |dlogp(a)| = |log p_engine(a) - log p_trainer(a)| <= 2 * eps * (1 - p(a))

so it vanishes for confident tokens and is largest for tail tokens. This module
bins ``|dlogp|`` by the trainer's ``p`` and reports, per bin, the mean, 99th
percentile, max and count; the mean and count come from
:func:`dvp_client.train.metrics.mismatch_metrics` (the library's own binning), the
quantiles are added here with the same bin membership (``lo <= p < hi``, the last
bin closed).

Bins are log-spaced in ``p`` below 1/2 and log-spaced in ``1 - p`` above it
(:func:`prob_edges`), so that both ends of the claim are resolved: the flat part
for tail tokens (``1 - p ~ 1``) and the linear decay as ``p -> 1``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from dvp_client.train.metrics import mismatch_metrics
from torch import Tensor

__all__ = [
    "BinStats",
    "binned_abs_dlogp",
    "bound_violation_fraction",
    "fit_eps",
    "logit_eps",
    "prob_edges",
    "quantiles",
    "seq_spread_by_length",
    "spearman",
]

MIN_BIN_COUNT = 20  # bins with fewer tokens are reported but left out of fits and ranks


@dataclass(frozen=True)
class BinStats:
    """``|dlogp|`` of the tokens whose trainer probability lies in ``[lo, hi)``.

    Attributes:
        lo, hi: bin edges in p.
        count: tokens in the bin.
        mean, p99, max: of ``|dlogp|`` (NaN for an empty bin).
        one_minus_p: mean of ``1 - p`` over the bin's tokens (NaN when empty).
    """

    lo: float
    hi: float
    count: int
    mean: float
    p99: float
    max: float
    one_minus_p: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def prob_edges(decades: int = 6, per_decade: int = 2) -> list[float]:
    """Bin edges in p: ``0``, log-spaced up to 1/2, then ``1 - `` log-spaced down to 1.

    Example (``decades=2, per_decade=1``): ``[0, 0.01, 0.1, 0.5, 0.9, 0.99, 1]``.

    Args:
        decades: decades covered on each side (down to ``10^-decades`` in p and in 1 - p).
        per_decade: edges per decade.

    Returns:
        Increasing edges, ``0`` first and ``1`` last.

    Raises:
        ValueError: ``decades`` or ``per_decade`` < 1.
    """
    if decades < 1 or per_decade < 1:
        raise ValueError(f"decades and per_decade must be >= 1, got {decades}, {per_decade}")
    k = decades * per_decade
    low = [10.0 ** (-(k - i) / per_decade) for i in range(k)]  # 1e-d .. 10^(-1/per)
    high = [1.0 - x for x in reversed(low)]
    return [0.0, *low, 0.5, *high, 1.0]


def quantiles(x: Tensor, qs: Sequence[float]) -> list[float]:
    """Quantiles of a 1-d tensor (linear interpolation, float64); NaN when empty.

    ``torch.quantile`` refuses more than 2^24 elements, so larger inputs go through numpy.
    """
    if x.numel() == 0:
        return [math.nan] * len(qs)
    arr = x.detach().double().cpu().numpy()
    return [float(v) for v in np.quantile(arr, list(qs))]


def binned_abs_dlogp(
    engine_logp: Tensor, trainer_logp: Tensor, mask: Tensor, edges: Sequence[float]
) -> list[BinStats]:
    """Per-bin statistics of ``|dlogp| = |trainer - engine|``, binned by trainer ``p``.

    Args:
        engine_logp, trainer_logp: ``[B, T]`` log-probs of the same tokens (any float dtype).
        mask: bool ``[B, T]``, the tokens that count.
        edges: increasing bin edges in [0, 1] (e.g. :func:`prob_edges`).

    Returns:
        One :class:`BinStats` per bin. Mean and count are
        :func:`dvp_client.train.metrics.mismatch_metrics`'s ``abs_dlogp_bin_*`` /
        ``count_bin_*``.

    Raises:
        ValueError: two bins would share a metrics key (edges closer than ``%g`` prints).
    """
    keys = {f"{lo:g}_{hi:g}" for lo, hi in itertools.pairwise(edges)}
    if len(keys) != len(edges) - 1:
        raise ValueError(f"bin edges must differ in 6 significant digits, got {list(edges)}")
    m = mismatch_metrics(mask, engine_logp, trainer_logp, prob_bins=edges, quantiles=())
    d = (trainer_logp.double() - engine_logp.double())[mask].abs()
    p = trainer_logp.double()[mask].exp()
    out = []
    for k, (lo, hi) in enumerate(itertools.pairwise(edges)):
        last = k == len(edges) - 2
        sel = (p >= lo) & ((p <= hi) if last else (p < hi))
        q99 = quantiles(d[sel], [0.99])[0]
        out.append(
            BinStats(
                lo=float(lo),
                hi=float(hi),
                count=int(m[f"mismatch/count_bin_{lo:g}_{hi:g}"]),
                mean=m[f"mismatch/abs_dlogp_bin_{lo:g}_{hi:g}"],
                p99=q99,
                max=float(d[sel].max()) if bool(sel.any()) else math.nan,
                one_minus_p=float((1.0 - p[sel]).mean()) if bool(sel.any()) else math.nan,
            )
        )
    return out


def _usable(bins: Sequence[BinStats], min_count: int) -> list[BinStats]:
    return [b for b in bins if b.count >= min_count and b.one_minus_p > 0 and b.mean > 0]


def fit_eps(bins: Sequence[BinStats], min_count: int = MIN_BIN_COUNT) -> dict[str, float]:
    """Fit eps of the bound shape ``2 eps (1 - p)`` to binned ``|dlogp|``.

    Two fits over the bins with at least ``min_count`` tokens:

    - ``eps_bound``: the smallest eps whose curve lies on or above every bin's
      99th percentile at the bin's largest ``1 - p`` (its lower edge):
      ``max_b p99_b / (2 (1 - lo_b))``. This is the bound's eps, read from the data.
    - ``eps_mean``: least squares in log space of the bin means against the shape,
      ``log eps = mean_b log(mean_b / (2 mean_b(1 - p)))``: the typical error's scale.

    Returns:
        ``{"eps_bound", "eps_mean", "bins_used"}`` (NaN eps when no bin is usable).
    """
    use = _usable(bins, min_count)
    if not use:
        return {"eps_bound": math.nan, "eps_mean": math.nan, "bins_used": 0}
    bound = max(b.p99 / (2.0 * (1.0 - b.lo)) for b in use if b.lo < 1.0)
    logs = [math.log(b.mean / (2.0 * b.one_minus_p)) for b in use]
    return {
        "eps_bound": float(bound),
        "eps_mean": float(math.exp(sum(logs) / len(logs))),
        "bins_used": len(use),
    }


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1, dtype=np.float64)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return np.asarray(sums[inv] / counts[inv], dtype=np.float64)


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation: the Pearson correlation of the (average-tie) ranks.

    Returns NaN for fewer than 3 pairs or a constant input.
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"x and y must be 1-d of one length, got {a.shape} and {b.shape}")
    if len(a) < 3:
        return math.nan
    ra, rb = _ranks(a) - (len(a) + 1) / 2, _ranks(b) - (len(b) + 1) / 2
    den = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else math.nan


def spearman_bins(bins: Sequence[BinStats], min_count: int = MIN_BIN_COUNT) -> float:
    """Spearman correlation of per-bin mean ``|dlogp|`` against per-bin mean ``1 - p``."""
    use = _usable(bins, min_count)
    return spearman([b.mean for b in use], [b.one_minus_p for b in use])


def logit_eps(engine_logits: Tensor, trainer_logits: Tensor, temperature: float) -> Tensor:
    """Per-position eps of the bound: ``min_c |delta - c|_inf`` of the scaled logits.

    ``delta = (z_engine - z_trainer) / T`` over the vocabulary (T = 0 scores at 1);
    the best shift c is the midrange, so ``eps = (max delta - min delta) / 2``
    (a constant shift does not change any log-prob).

    Args:
        engine_logits, trainer_logits: ``[N, V]`` (bf16 / fp16 upcast to float32 here).
        temperature: T.

    Returns:
        float32 ``[N]`` (float64 for float64 logits).
    """
    inv_t = 1.0 if temperature == 0 else 1.0 / temperature
    dt = torch.promote_types(engine_logits.dtype, torch.float32)
    delta = (engine_logits.to(dt) - trainer_logits.to(dt)) * inv_t  # (N, V)
    return (delta.amax(-1) - delta.amin(-1)) / 2.0


def bound_violation_fraction(
    engine_logp: Tensor, trainer_logp: Tensor, eps: Tensor
) -> dict[str, float]:
    """How often ``|dlogp| > 2 eps (1 - p)`` with each position's own eps.

    The bound is first order; the exact error also carries ``log E_p exp(delta)``'s
    second-order part, at most ``eps^2 / 2``, so both are reported.

    Args:
        engine_logp, trainer_logp: ``[N, V]`` log-probs over the whole vocabulary.
        eps: ``[N]`` from :func:`logit_eps`.

    Returns:
        ``{"first_order", "with_second_order"}``: fractions of the ``N * V`` pairs;
        ``share_p_ge_0.01``: the fraction of pairs whose trainer p is at least 0.01,
        and ``first_order_p_ge_0.01``: the fraction of those above the first-order
        bound. Most pairs of a large vocabulary have p < 1e-6, where the bound is
        ``2 eps`` and holds by the definition of eps, so a check over all pairs is
        near automatic; the pairs with p >= 0.01 are the ones that test it.
    """
    d = (trainer_logp.double() - engine_logp.double()).abs()
    one_minus_p = -torch.expm1(trainer_logp.double())  # 1 - p, exact near p = 1
    e = eps.double().unsqueeze(-1)  # (N, 1)
    bound = 2.0 * e * one_minus_p
    above = d > bound
    large = trainer_logp.double() >= math.log(0.01)
    n_large = int(large.sum())
    return {
        "first_order": float(above.double().mean()),
        "with_second_order": float((d > bound + e * e / 2.0).double().mean()),
        "share_p_ge_0.01": n_large / max(large.numel(), 1),
        "first_order_p_ge_0.01": float(above[large].double().mean()) if n_large else math.nan,
    }


def seq_spread_by_length(d: Tensor, mask: Tensor, lengths: Sequence[int]) -> list[dict[str, float]]:
    """How the sequence log ratio spreads as a rollout grows (errors accumulate).

    For each ``L``, over the rollouts with at least ``L`` tokens, the prefix sum
    ``D_L = sum_{t < L} d_t`` (the log of the importance ratio of the first ``L``
    tokens): its standard deviation, mean ``|D_L|`` and max ``|D_L|``; and
    ``sqrt_l_ref = sd(d_t) * sqrt(L)``, the spread that independent per-token
    errors with the pooled per-token standard deviation would give.

    Args:
        d: ``(N, T)`` per-token log ratios (any float dtype; padding ignored).
        mask: ``(N, T)`` bool, True on real tokens (a prefix of each row).
        lengths: the ``L`` to report, increasing.

    Returns:
        One dict per ``L`` with at least two such rollouts: ``length``, ``rollouts``,
        ``std``, ``mean_abs``, ``max_abs``, ``sqrt_l_ref``.
    """
    dd = torch.where(mask, d.double(), torch.zeros((), dtype=torch.float64))
    cum = dd.cumsum(-1)  # (N, T)
    n_tok = mask.sum(-1)  # (N,)
    per_token = d.double()[mask]
    sd_tok = float(per_token.std()) if per_token.numel() > 1 else math.nan
    rows: list[dict[str, float]] = []
    for length in lengths:
        keep = n_tok >= length
        if length < 1 or length > d.shape[-1] or int(keep.sum()) < 2:
            continue
        prefix = cum[keep, length - 1]
        rows.append(
            {
                "length": float(length),
                "rollouts": float(keep.sum()),
                "std": float(prefix.std()),
                "mean_abs": float(prefix.abs().mean()),
                "max_abs": float(prefix.abs().max()),
                "sqrt_l_ref": sd_tok * math.sqrt(length),
            }
        )
    return rows
