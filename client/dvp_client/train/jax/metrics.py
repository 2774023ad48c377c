"""Engine-vs-trainer mismatch metrics for JAX arrays: the keys of
:mod:`dvp_client.train.metrics`, computed on the host in float64 (numpy).

With ``d_t = log pi(y_t) - log mu(y_t)`` (trainer minus engine) on the counted steps
(the loss mask minus the steps dropped in recompute mode; Schulman 2020,
"Approximating KL Divergence")::

    k1 = mean(-d)                   k3 = mean(exp(d) - 1 - d)

on the pruned log-probs (``*_pruned``) and the full ones (``*_full``, skipping the
engine's nulls), plus ``|d|`` mean / max, ``|d|`` by bins of the trainer's
``pi_S(y)``, ``dvp/frac_masked``, ``dvp/safe_size_mean``, ``dvp/pruned_mass_engine``
/ ``_trainer`` (mean ``1 - Z_S``), ``dvp/set_disagreement_rate`` and
``dvp/set_xor_mean``, ``is_weight/q{q}`` and ``is_weight/mean`` of ``exp(d)``
(pruned), and ``mismatch/tokens``. Means over no steps are NaN. Not ``jit``-able
(a dict of Python floats for a logger); call it outside the compiled step.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .logprobs import PrunedLogprobs
from .sets import RolloutArrays

__all__ = ["DEFAULT_PROB_BINS", "DEFAULT_QUANTILES", "batch_metrics", "mismatch_metrics"]

DEFAULT_PROB_BINS: tuple[float, ...] = (0.0, 1e-3, 1e-2, 0.1, 0.5, 0.9, 1.0)
DEFAULT_QUANTILES: tuple[float, ...] = (0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0)


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else math.nan


def _kl_keys(d: np.ndarray, suffix: str) -> dict[str, float]:
    return {
        f"mismatch/k1_{suffix}": _mean(-d),
        f"mismatch/k3_{suffix}": _mean(np.expm1(d) - d),
        f"mismatch/abs_dlogp_mean_{suffix}": _mean(np.abs(d)),
        f"mismatch/abs_dlogp_max_{suffix}": float(np.abs(d).max()) if d.size else math.nan,
    }


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def mismatch_metrics(
    mask: Any,
    engine_masked: Any,
    trainer_masked: Any,
    *,
    engine_full: Any = None,
    trainer_full: Any = None,
    engine_logmass: Any = None,
    trainer_logmass: Any = None,
    safe_sizes: Any = None,
    set_disagreement: Any = None,
    dropped: Any = None,
    prob_bins: Sequence[float] = DEFAULT_PROB_BINS,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
) -> dict[str, float]:
    """Mismatch metrics over the counted steps (keys in the module docstring).

    Args:
        mask: bool ``[B, T]``, the loss mask.
        engine_masked, trainer_masked: ``[B, T]`` ``log pi_S(y)`` of each side.
        engine_full, trainer_full: ``[B, T]`` ``log p(y)``; engine NaN = not given.
        engine_logmass, trainer_logmass: ``[B, T]`` ``log Z_S``; engine NaN = not given.
        safe_sizes: int ``[B, T]`` engine ``|S|``.
        set_disagreement: int ``[B, T]`` ``|S xor S'|`` (recompute mode).
        dropped: bool ``[B, T]``, y not in S' (recompute mode).
        prob_bins: increasing edges in [0, 1] for ``pi_S(y)``.
        quantiles: importance-weight quantiles in [0, 1].

    Returns:
        ``dict[str, float]``.

    Raises:
        ValueError: a shape differs from ``mask``'s, or bad bins / quantiles.
    """
    m = np.asarray(mask, dtype=bool)
    named = {
        "engine_masked": engine_masked,
        "trainer_masked": trainer_masked,
        "engine_full": engine_full,
        "trainer_full": trainer_full,
        "engine_logmass": engine_logmass,
        "trainer_logmass": trainer_logmass,
        "safe_sizes": safe_sizes,
        "set_disagreement": set_disagreement,
        "dropped": dropped,
    }
    for name, x in named.items():
        if x is not None and tuple(np.shape(x)) != m.shape:
            raise ValueError(f"{name} must be {list(m.shape)} like mask, got {list(np.shape(x))}")
    if list(prob_bins) != sorted(prob_bins) or len(prob_bins) < 2:
        raise ValueError(f"prob_bins must be increasing with >= 2 edges, got {list(prob_bins)}")
    if any(not 0 <= q <= 1 for q in quantiles):
        raise ValueError(f"quantiles must be in [0, 1], got {list(quantiles)}")
    drop = None if dropped is None else np.asarray(dropped, dtype=bool)
    steps = m if drop is None else m & ~drop
    tm = _f64(trainer_masked)
    d = (tm - _f64(engine_masked))[steps]
    out = {"mismatch/tokens": float(steps.sum())}
    out.update(_kl_keys(d, "pruned"))
    if engine_full is not None and trainer_full is not None:
        ef = _f64(engine_full)
        sel = m & np.isfinite(ef)
        out.update(_kl_keys((_f64(trainer_full) - ef)[sel], "full"))
    prob = np.exp(tm[steps])
    for k, (lo, hi) in enumerate(itertools.pairwise(prob_bins)):
        last = k == len(prob_bins) - 2
        sel = (prob >= lo) & ((prob <= hi) if last else (prob < hi))
        out[f"mismatch/abs_dlogp_bin_{lo:g}_{hi:g}"] = _mean(np.abs(d[sel]))
        out[f"mismatch/count_bin_{lo:g}_{hi:g}"] = float(sel.sum())
    n_mask = max(int(m.sum()), 1)
    out["dvp/frac_masked"] = 0.0 if drop is None else int((drop & m).sum()) / n_mask
    if safe_sizes is not None:
        out["dvp/safe_size_mean"] = _mean(_f64(safe_sizes)[m])
    if engine_logmass is not None:
        el = _f64(engine_logmass)
        out["dvp/pruned_mass_engine"] = _mean(-np.expm1(el[m & np.isfinite(el)]))
    if trainer_logmass is not None:
        out["dvp/pruned_mass_trainer"] = _mean(-np.expm1(_f64(trainer_logmass)[steps]))
    if set_disagreement is not None:
        sd = _f64(set_disagreement)[m]
        out["dvp/set_disagreement_rate"] = _mean((sd > 0).astype(np.float64))
        out["dvp/set_xor_mean"] = _mean(sd)
    w = np.exp(d)
    out["is_weight/mean"] = _mean(w)
    qs = np.quantile(w, list(quantiles)) if w.size else None
    for k, q in enumerate(quantiles):
        out[f"is_weight/q{q:g}"] = math.nan if qs is None else float(qs[k])
    return out


def batch_metrics(arrays: RolloutArrays, result: PrunedLogprobs, **kwargs: Any) -> dict[str, float]:
    """:func:`mismatch_metrics` for a batch from ``rollouts_to_arrays`` and its log-probs."""
    return mismatch_metrics(
        arrays.loss_mask,
        arrays.engine_masked_logprobs,
        result.logprobs,
        engine_full=arrays.engine_logprobs,
        trainer_full=result.full_logprobs,
        engine_logmass=arrays.engine_safe_logmass,
        trainer_logmass=result.log_z,
        safe_sizes=arrays.safe_sizes,
        set_disagreement=result.set_disagreement,
        dropped=result.y_not_in_set,
        **kwargs,
    )
