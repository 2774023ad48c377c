"""Stale tokens in asynchronous RL: how many policy versions behind the trainer each token is.

With in-flight weight updates a rollout may span policy versions. Per completion
token ``t`` the service reports (int ``[B, T]``, padding filled with the row's last
version):

- ``token_policy_versions`` ``v_t``: the policy version that sampled the token;
- ``token_kv_versions`` ``kv_t``: the oldest version whose keys/values any earlier
  position of the token's context was computed with (``kv_t <= v_t``; ``kv_t < v_t``
  when the weights changed mid-rollout and the prefix KV was kept).

With the trainer at version ``V`` a token is ``behind_t`` versions stale::

    behind_t = V - min(v_t, kv_t)          (V - v_t when kv_t is not given)

A token sampled by new weights over KV computed by older ones counts as stale: its
distribution mixes both versions, so it is as old as the oldest weights it read.

Metrics (:func:`staleness_metrics`, keys under ``staleness/``), with
``d_t = log pi_S(y_t) - log mu_S(y_t)`` (trainer minus engine masked log-prob, as in
:mod:`dvp_client.train.metrics`) on the counted steps:

- ``tokens``: number of counted steps
- ``behind_mean``, ``behind_max``: mean and max ``behind_t``
- ``frac_stale``: share with ``behind_t > 0``
- ``frac_kv_older``: share with ``kv_t < v_t`` (0 when ``kv_t`` is not given)
- ``count_behind_{k}``, ``k3_behind_{k}``, ``abs_dlogp_behind_{k}`` for the buckets
  ``k`` in ``0, 1, 2, 3plus`` (``behind_t`` = 0, 1, 2, >= 3): token count,
  ``mean(exp(d) - 1 - d)`` and ``mean(|d|)``; NaN for an empty bucket

Means over no steps are NaN (``behind_max`` too).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "STALENESS_BUCKETS",
    "stale_tokens",
    "staleness_metrics",
    "versions_behind",
    "versions_given",
]

# (key suffix, lowest behind, highest behind or None for "and above")
STALENESS_BUCKETS: tuple[tuple[str, int, int | None], ...] = (
    ("0", 0, 0),
    ("1", 1, 1),
    ("2", 2, 2),
    ("3plus", 3, None),
)


def versions_given(
    token_policy_versions: Tensor | None,
    trainer_version: int | None,
    token_kv_versions: Tensor | None = None,
) -> bool:
    """True when the version arguments are given, False when none is.

    Raises:
        ValueError: only some of them given (``token_kv_versions`` is optional).
    """
    if token_policy_versions is not None and trainer_version is None:
        raise ValueError("token_policy_versions needs trainer_version, got None")
    if token_policy_versions is None and trainer_version is not None:
        raise ValueError(f"trainer_version={trainer_version!r} needs token_policy_versions")
    if token_policy_versions is None and token_kv_versions is not None:
        raise ValueError("token_kv_versions needs token_policy_versions and trainer_version")
    return token_policy_versions is not None


def _check_version_tensor(name: str, x: Tensor, shape: torch.Size) -> None:
    if x.shape != shape:
        raise ValueError(f"{name} must be {list(shape)} like mask, got {list(x.shape)}")
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")


def _first(bad: Tensor) -> tuple[int, int]:
    i, j = (int(v) for v in bad.nonzero()[0])
    return i, j


def versions_behind(
    mask: Tensor,
    token_policy_versions: Tensor,
    trainer_version: int,
    token_kv_versions: Tensor | None = None,
) -> Tensor:
    """``behind_t = V - min(v_t, kv_t)`` (module docstring), checked on the mask.

    Args:
        mask: bool ``[B, T]``, the steps that count.
        token_policy_versions: int ``[B, T]`` ``v_t``.
        trainer_version: ``V``, the version of the trainer's current weights.
        token_kv_versions: int ``[B, T]`` ``kv_t``; None counts ``v_t`` only.

    Returns:
        int64 ``[B, T]`` ``behind_t``; 0 where ``mask`` is False.

    Raises:
        ValueError: a shape or dtype that does not fit, a ``trainer_version`` that is
            not an int, a masked-in token newer than the trainer or with
            ``kv_t > v_t`` (the message gives batch b, step t and the values).
    """
    if isinstance(trainer_version, bool) or not isinstance(trainer_version, int):
        raise ValueError(f"trainer_version must be an int, got {trainer_version!r}")
    _check_version_tensor("token_policy_versions", token_policy_versions, mask.shape)
    v = token_policy_versions.long()
    oldest = v
    if token_kv_versions is not None:
        _check_version_tensor("token_kv_versions", token_kv_versions, mask.shape)
        kv = token_kv_versions.long()
        bad = mask & (kv > v)
        if bool(bad.any()):
            i, j = _first(bad)
            raise ValueError(
                f"token_kv_versions must be <= token_policy_versions, got {int(kv[i, j])} > "
                f"{int(v[i, j])} at batch {i}, step {j}"
            )
        oldest = torch.minimum(v, kv)
    bad = mask & (v > trainer_version)
    if bool(bad.any()):
        i, j = _first(bad)
        raise ValueError(
            f"token_policy_versions must be <= trainer_version {trainer_version}, got "
            f"{int(v[i, j])} at batch {i}, step {j}"
        )
    return torch.where(mask, trainer_version - oldest, 0)


def stale_tokens(
    mask: Tensor,
    max_staleness: int,
    token_policy_versions: Tensor,
    trainer_version: int,
    token_kv_versions: Tensor | None = None,
) -> Tensor:
    """Masked-in tokens more than ``max_staleness`` versions behind: ``m_t 1[behind_t > s]``.

    Args:
        mask, token_policy_versions, trainer_version, token_kv_versions: as in
            :func:`versions_behind`.
        max_staleness: ``s >= 0``; 0 keeps only tokens of the trainer's version.

    Returns:
        bool ``[B, T]``.

    Raises:
        ValueError: as :func:`versions_behind`.
    """
    behind = versions_behind(mask, token_policy_versions, trainer_version, token_kv_versions)
    return mask & (behind > max_staleness)


def _mean(x: Tensor) -> float:
    return float(x.double().mean()) if x.numel() else math.nan


def staleness_metrics(
    mask: Tensor,
    engine_masked: Tensor,
    trainer_masked: Tensor,
    token_policy_versions: Tensor,
    trainer_version: int,
    token_kv_versions: Tensor | None = None,
) -> dict[str, float]:
    """Staleness of the counted steps and the mismatch per staleness bucket (keys above).

    Args:
        mask: bool ``[B, T]``, the counted steps (the loss mask, minus the steps
            dropped in recompute mode).
        engine_masked, trainer_masked: ``[B, T]`` ``log pi_S(y)`` from each side.
        token_policy_versions, trainer_version, token_kv_versions: as in
            :func:`versions_behind`.

    Returns:
        ``dict[str, float]``, keys prefixed ``staleness/``.

    Raises:
        ValueError: as :func:`versions_behind`; log-probs shaped unlike ``mask``.
    """
    for name, x in (("engine_masked", engine_masked), ("trainer_masked", trainer_masked)):
        if x.shape != mask.shape:
            raise ValueError(f"{name} must be {list(mask.shape)} like mask, got {list(x.shape)}")
    behind = versions_behind(mask, token_policy_versions, trainer_version, token_kv_versions)[mask]
    d = (trainer_masked.detach().double() - engine_masked.detach().double())[mask]
    kv_older = (
        torch.zeros_like(behind, dtype=torch.bool)
        if token_kv_versions is None
        else (token_kv_versions.long() < token_policy_versions.long())[mask]
    )
    out = {
        "staleness/tokens": float(mask.sum()),
        "staleness/behind_mean": _mean(behind),
        "staleness/behind_max": float(behind.max()) if behind.numel() else math.nan,
        "staleness/frac_stale": _mean(behind > 0),
        "staleness/frac_kv_older": _mean(kv_older),
    }
    for name, lo, hi in STALENESS_BUCKETS:
        sel = (behind >= lo) if hi is None else (behind >= lo) & (behind <= hi)
        ds = d[sel]
        out[f"staleness/count_behind_{name}"] = float(sel.sum())
        out[f"staleness/k3_behind_{name}"] = _mean(torch.expm1(ds) - ds)
        out[f"staleness/abs_dlogp_behind_{name}"] = _mean(ds.abs())
    return out
