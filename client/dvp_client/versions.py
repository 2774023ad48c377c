"""Per-token weight versions of a rollout, as spans on the wire and arrays in memory.

With in-flight weight updates (``on_inflight`` keep / recompute) a rollout can span
policy versions. The wire carries runs of equal versions,
``version_spans = [[first token index, policy_version, kv_version], ...]`` (one span
when nothing changed); a trainer wants one value per token. The server builds the
spans with :func:`spans_from_versions`, the client expands them with
:func:`expand_spans`: each is the other's inverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["expand_spans", "rollout_versions", "spans_from_versions"]

Span = tuple[int, int, int]


def spans_from_versions(
    policy_versions: np.ndarray, kv_versions: np.ndarray, start: int = 0
) -> list[Span]:
    """Runs of equal ``(policy_version, kv_version)`` as ``(index, pv, kv)`` triples.

    Args:
        policy_versions: int ``(T,)``, the version that sampled each token.
        kv_versions: int ``(T,)``, the oldest version of the keys / values each read.
        start: the index of the first token (a stream chunk's ``start``).

    Returns:
        One triple per run, in token order; empty when ``T = 0``.
    """
    pv = np.asarray(policy_versions, dtype=np.int64)
    kv = np.asarray(kv_versions, dtype=np.int64)
    if pv.shape != kv.shape or pv.ndim != 1:
        raise ValueError(f"versions must be two (T,) arrays, got {pv.shape} and {kv.shape}")
    if not len(pv):
        return []
    change = np.flatnonzero((pv[1:] != pv[:-1]) | (kv[1:] != kv[:-1])) + 1
    heads = np.concatenate([[0], change])
    return [(int(i) + start, int(pv[i]), int(kv[i])) for i in heads]


def expand_spans(spans: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-token ``(policy_versions, kv_versions)``, int64 ``(length,)`` each.

    Args:
        spans: ``[index, policy_version, kv_version]`` runs, indices ascending from 0.
        length: the rollout's token count.

    Raises:
        ValueError: spans that do not start at 0, are not ascending, or pass ``length``.
    """
    pv = np.zeros(length, dtype=np.int64)
    kv = np.zeros(length, dtype=np.int64)
    if length == 0:
        return pv, kv
    if not spans or int(spans[0][0]) != 0:
        raise ValueError("version_spans must start at token 0")
    bounds = [int(s[0]) for s in spans] + [length]
    for (i, p, k), end in zip(spans, bounds[1:], strict=True):
        if not int(i) < end <= length:
            raise ValueError(f"version_spans are not ascending within {length} tokens: {spans}")
        pv[int(i) : end] = int(p)
        kv[int(i) : end] = int(k)
    return pv, kv


def rollout_versions(rollout: Any) -> tuple[np.ndarray, np.ndarray]:
    """A :class:`~dvp_schemas.Rollout`'s per-token ``(policy_versions, kv_versions)``,
    int64 ``(T,)`` each; a rollout without spans (an older server) is all
    ``policy_version``."""
    t = len(rollout.token_ids)
    if rollout.version_spans is None:
        full = np.full(t, rollout.policy_version, dtype=np.int64)
        return full, full.copy()
    return expand_spans(rollout.version_spans, t)
