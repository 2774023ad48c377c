"""Engine-vs-trainer mismatch metrics, as a dict of floats ready for a logger.

Tokens are sampled by the engine (behaviour mu), the trainer scores them (pi).
With ``d_t = log pi(y_t) - log mu(y_t)`` on the counted steps (Schulman 2020,
"Approximating KL Divergence", joschu.net/blog/kl-approx.html)::

    k1 = mean(-d)                  unbiased for KL(mu || pi), high variance
    k3 = mean(exp(d) - 1 - d)      unbiased for KL(mu || pi), >= 0, low variance

computed on the pruned log-probs (``*_pruned``: mu_S, pi_S over the same S, the
DVP objective's ratio) and on the full ones (``*_full``; steps where the engine
gave null are skipped; NaN when none is left). Keys:

- ``mismatch/k1_pruned``, ``k3_pruned``, ``k1_full``, ``k3_full``
- ``mismatch/abs_dlogp_mean_pruned`` / ``_max_pruned``, same ``_full``
- ``mismatch/abs_dlogp_bin_{lo}_{hi}`` and ``mismatch/count_bin_{lo}_{hi}``: mean
  pruned ``|d|`` and token count for trainer ``pi_S(y)`` in ``[lo, hi)`` (the
  last bin includes 1); a bin without tokens gives NaN
- ``dvp/frac_masked``: steps dropped because y is not in S' (recompute mode)
- ``dvp/safe_size_mean``: mean engine ``|S|``
- ``dvp/pruned_mass_engine`` / ``_trainer``: mean ``1 - Z_S`` (engine: where given)
- ``dvp/set_disagreement_rate``: fraction of steps with ``S != S'``;
  ``dvp/set_xor_mean``: mean ``|S xor S'|`` (recompute mode)
- ``is_weight/q{q}``, ``is_weight/mean``: quantiles and mean of the token
  importance weight ``exp(d)`` (pruned)
- ``mismatch/tokens``: number of steps counted

Counted steps: the loss mask minus the steps dropped in recompute mode. Means
over no steps are NaN.

:func:`batch_metrics` adds the ``staleness/...`` keys of
:mod:`dvp_client.train.staleness` (versions behind the trainer, and k3 / ``|d|`` per
staleness bucket) when given the per-token versions and the trainer's version.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .objective import PrunedLogprobs
from .staleness import staleness_metrics, versions_given
from .tensors import RolloutTensors

__all__ = ["DEFAULT_PROB_BINS", "DEFAULT_QUANTILES", "batch_metrics", "mismatch_metrics"]

DEFAULT_PROB_BINS: tuple[float, ...] = (0.0, 1e-3, 1e-2, 0.1, 0.5, 0.9, 1.0)
DEFAULT_QUANTILES: tuple[float, ...] = (0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0)


def _mean(x: Tensor) -> float:
    return float(x.double().mean()) if x.numel() else math.nan


def _kl_keys(d: Tensor, suffix: str) -> dict[str, float]:
    """k1, k3 and |d| statistics of log-ratios ``d = log pi - log mu`` (1-d)."""
    d = d.double()
    return {
        f"mismatch/k1_{suffix}": _mean(-d),
        f"mismatch/k3_{suffix}": _mean(torch.expm1(d) - d),
        f"mismatch/abs_dlogp_mean_{suffix}": _mean(d.abs()),
        f"mismatch/abs_dlogp_max_{suffix}": float(d.abs().max()) if d.numel() else math.nan,
    }


def _bins(d: Tensor, prob: Tensor, edges: Sequence[float]) -> dict[str, float]:
    out = {}
    for k, (lo, hi) in enumerate(itertools.pairwise(edges)):
        last = k == len(edges) - 2
        sel = (prob >= lo) & ((prob <= hi) if last else (prob < hi))
        out[f"mismatch/abs_dlogp_bin_{lo:g}_{hi:g}"] = _mean(d[sel].abs())
        out[f"mismatch/count_bin_{lo:g}_{hi:g}"] = float(sel.sum())
    return out


def mismatch_metrics(
    mask: Tensor,
    engine_masked: Tensor,
    trainer_masked: Tensor,
    *,
    engine_full: Tensor | None = None,
    trainer_full: Tensor | None = None,
    engine_logmass: Tensor | None = None,
    trainer_logmass: Tensor | None = None,
    safe_sizes: Tensor | None = None,
    set_disagreement: Tensor | None = None,
    dropped: Tensor | None = None,
    prob_bins: Sequence[float] = DEFAULT_PROB_BINS,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
) -> dict[str, float]:
    """Mismatch metrics over the counted steps (keys in the module docstring).

    Args:
        mask: bool ``[B, T]``, the loss mask.
        engine_masked, trainer_masked: ``[B, T]`` ``log pi_S(y)`` from each side.
        engine_full, trainer_full: ``[B, T]`` ``log p(y)``; engine NaN = not given.
        engine_logmass, trainer_logmass: ``[B, T]`` ``log Z_S``; engine NaN = not given.
        safe_sizes: int ``[B, T]`` engine ``|S|``.
        set_disagreement: int ``[B, T]`` ``|S xor S'|`` (recompute mode).
        dropped: bool ``[B, T]``, y not in S' (recompute mode).
        prob_bins: increasing bin edges in [0, 1] for ``pi_S(y)``.
        quantiles: importance-weight quantiles in [0, 1].

    Returns:
        ``dict[str, float]``.

    Raises:
        ValueError: a shape differs from ``mask``'s, or bad bins / quantiles.
    """
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
        if x is not None and x.shape != mask.shape:
            raise ValueError(f"{name} must be {list(mask.shape)} like mask, got {list(x.shape)}")
    if list(prob_bins) != sorted(prob_bins) or len(prob_bins) < 2:
        raise ValueError(f"prob_bins must be increasing with >= 2 edges, got {list(prob_bins)}")
    if any(not 0 <= q <= 1 for q in quantiles):
        raise ValueError(f"quantiles must be in [0, 1], got {list(quantiles)}")
    steps = mask if dropped is None else mask & ~dropped
    d = (trainer_masked.detach() - engine_masked.detach()).double()[steps]
    out = {"mismatch/tokens": float(steps.sum())}
    out.update(_kl_keys(d, "pruned"))
    if engine_full is not None and trainer_full is not None:
        sel = mask & torch.isfinite(engine_full)
        out.update(_kl_keys((trainer_full.detach() - engine_full).double()[sel], "full"))
    out.update(_bins(d, trainer_masked.detach().double()[steps].exp(), prob_bins))
    n_mask = max(int(mask.sum()), 1)
    out["dvp/frac_masked"] = 0.0 if dropped is None else int((dropped & mask).sum()) / n_mask
    if safe_sizes is not None:
        out["dvp/safe_size_mean"] = _mean(safe_sizes[mask])
    if engine_logmass is not None:
        sel = mask & torch.isfinite(engine_logmass)
        out["dvp/pruned_mass_engine"] = _mean(-torch.expm1(engine_logmass.double()[sel]))
    if trainer_logmass is not None:
        out["dvp/pruned_mass_trainer"] = _mean(-torch.expm1(trainer_logmass.double()[steps]))
    if set_disagreement is not None:
        out["dvp/set_disagreement_rate"] = _mean((set_disagreement[mask] > 0).double())
        out["dvp/set_xor_mean"] = _mean(set_disagreement[mask].double())
    w = d.exp()
    out["is_weight/mean"] = _mean(w)
    qs = torch.quantile(w, torch.tensor(list(quantiles), dtype=w.dtype)) if w.numel() else None
    for k, q in enumerate(quantiles):
        out[f"is_weight/q{q:g}"] = math.nan if qs is None else float(qs[k])
    return out


def batch_metrics(
    tensors: RolloutTensors,
    result: PrunedLogprobs,
    *,
    token_policy_versions: Tensor | None = None,
    token_kv_versions: Tensor | None = None,
    trainer_version: int | None = None,
    **kwargs: object,
) -> dict[str, float]:
    """:func:`mismatch_metrics` for a batch from ``to_torch`` and its ``pruned_logprobs``.

    Given the per-token versions and the trainer's version (async RL), the result also
    holds :func:`dvp_client.train.staleness.staleness_metrics` over the same counted
    steps (keys ``staleness/...``).

    Args:
        tensors: the batch, ``[B, T]`` completion steps.
        result: the trainer's pruned log-probs of ``tensors.tokens``.
        token_policy_versions: int ``[B, T]``, the version that sampled each token.
        token_kv_versions: int ``[B, T]``, the oldest version whose KV each token's
            context read; None counts the policy version only.
        trainer_version: the trainer's current version; needed with the versions.
        **kwargs: passed to :func:`mismatch_metrics` (``prob_bins``, ``quantiles``).

    Returns:
        ``dict[str, float]``.

    Raises:
        ValueError: versions without ``trainer_version`` or the reverse, and what
            :func:`mismatch_metrics` / :func:`staleness_metrics` raise.
    """
    versions_given(token_policy_versions, trainer_version, token_kv_versions)  # all or none
    out = mismatch_metrics(
        tensors.loss_mask,
        tensors.engine_masked_logprobs,
        result.logprobs,
        engine_full=tensors.engine_logprobs,
        trainer_full=result.full_logprobs,
        engine_logmass=tensors.engine_safe_logmass,
        trainer_logmass=result.log_z,
        safe_sizes=tensors.safe_sizes,
        set_disagreement=result.set_disagreement,
        dropped=result.y_not_in_set,
        **kwargs,  # type: ignore[arg-type]
    )
    if token_policy_versions is not None and trainer_version is not None:
        dropped = result.y_not_in_set
        steps = tensors.loss_mask if dropped is None else tensors.loss_mask & ~dropped
        out.update(
            staleness_metrics(
                steps,
                tensors.engine_masked_logprobs,
                result.logprobs,
                token_policy_versions,
                trainer_version,
                token_kv_versions,
            )
        )
    return out
