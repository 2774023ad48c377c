"""Float64 numpy references of every trainer-side formula (docs/protocol.md), written
the slow, obvious way: one step or one rollout at a time, no torch."""

from __future__ import annotations

import math

import numpy as np


def lse(x: np.ndarray) -> float:
    """log sum exp of a 1-d array (-inf for an empty one)."""
    if x.size == 0:
        return -math.inf
    m = float(np.max(x))
    return m + math.log(float(np.sum(np.exp(x - m))))


def rule_set(z: np.ndarray, t: float, min_p: float, top_k: int | None, top_p: float) -> np.ndarray:
    """The safe set of one step as a bool mask (temperature -> min-p -> top-k -> top-p)."""
    z = z.astype(np.float64)
    if t == 0:
        keep = np.zeros(len(z), bool)
        keep[int(np.argmax(z))] = True
        return keep
    u = z / t
    p = np.exp(u - lse(u))
    keep = p >= min_p * p.max()
    if top_k:
        kept = np.sort(u[keep])[::-1]
        if top_k < len(kept):
            keep &= u >= kept[top_k - 1]
    if top_p < 1:
        order = [i for i in np.argsort(-u, kind="stable") if keep[i]]
        mass = p[order] / p[order].sum()
        new = np.zeros(len(z), bool)
        before = 0.0
        for j, i in enumerate(order):
            if before < top_p or j == 0:
                new[i] = True
            before += mass[j]
        keep = new
    return keep


def step_logprobs(z: np.ndarray, s: np.ndarray, y: int, t: float) -> dict[str, float]:
    """log pi_S(y), log p(y), log Z_S for one step (T = 0 scores at T = 1)."""
    u = z.astype(np.float64) / (1.0 if t == 0 else t)
    lse_v, lse_s = lse(u), lse(u[s])
    return {"masked": u[y] - lse_s, "full": u[y] - lse_v, "log_z": lse_s - lse_v}


def step_grad(z: np.ndarray, s: np.ndarray, y: int, t: float, g_m: float, g_f: float) -> np.ndarray:
    """d/dz of g_m log pi_S(y) + g_f log p(y): (g_m (e_y - pi_S 1_S) + g_f (e_y - p)) / T."""
    tt = 1.0 if t == 0 else t
    u = z.astype(np.float64) / tt
    p = np.exp(u - lse(u))
    pi_s = np.where(s, np.exp(u - lse(u[s])), 0.0)
    e_y = np.zeros_like(u)
    e_y[y] = 1.0
    return (g_m * (e_y - pi_s) + g_f * (e_y - p)) / tt


def correction(
    log_rho: np.ndarray, mask: np.ndarray, mode: str, cap: float, band: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Weights and kept tokens of one correction mode for a [B, T] batch, row by row."""
    b, t = log_rho.shape
    w = np.zeros((b, t))
    keep = np.zeros((b, t), bool)
    for i in range(b):
        seq = sum(log_rho[i, j] for j in range(t) if mask[i, j])
        for j in range(t):
            if not mask[i, j]:
                continue
            rho, rho_seq = math.exp(log_rho[i, j]), math.exp(seq)
            if mode == "none":
                w[i, j], keep[i, j] = 1.0, True
            elif mode == "token-tis":
                w[i, j], keep[i, j] = min(rho, cap), True
            elif mode == "seq-tis":
                w[i, j], keep[i, j] = min(rho_seq, cap), True
            elif mode == "token-mis":
                keep[i, j] = rho <= cap
                w[i, j] = rho if keep[i, j] else 0.0
            elif mode == "seq-mis":
                keep[i, j] = rho_seq <= cap
                w[i, j] = rho_seq if keep[i, j] else 0.0
            elif mode == "icepop":
                keep[i, j] = band[0] <= rho <= band[1]
                w[i, j] = rho if keep[i, j] else 0.0
            else:
                raise ValueError(mode)
    return w, keep


def ppo_loss(
    logp: np.ndarray,
    old: np.ndarray,
    eng: np.ndarray,
    adv: np.ndarray,
    mask: np.ndarray,
    *,
    mode: str = "none",
    agg: str = "token-mean",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    cap: float = 2.0,
    band: tuple[float, float] = (0.5, 5.0),
) -> float:
    """The clipped surrogate with a correction and an aggregation, in float64."""
    w, keep = correction(np.where(mask, old - eng, 0.0), mask, mode, cap, band)
    b, t = logp.shape
    a = adv if adv.ndim == 2 else np.repeat(adv[:, None], t, axis=1)
    per = np.zeros((b, t))
    for i in range(b):
        for j in range(t):
            if keep[i, j]:
                r = math.exp(logp[i, j] - old[i, j])
                clipped = min(max(r, 1 - eps_low), 1 + eps_high)
                per[i, j] = -w[i, j] * min(r * a[i, j], clipped * a[i, j])
    if agg == "token-mean":
        return float(per[keep].sum() / max(keep.sum(), 1))
    seqs = [i for i in range(b) if keep[i].any()]
    if not seqs:
        return 0.0
    if agg == "seq-mean-token-mean":
        return float(np.mean([per[i][keep[i]].sum() / keep[i].sum() for i in seqs]))
    if agg == "seq-mean-token-sum":
        return float(np.mean([per[i][keep[i]].sum() for i in seqs]))
    raise ValueError(agg)


def group_advantages(
    rewards: np.ndarray, groups: np.ndarray, scale: bool, eps: float
) -> np.ndarray:
    """GRPO advantages, one group at a time (unbiased std; singleton groups -> 0)."""
    out = np.zeros(len(rewards))
    for g in np.unique(groups):
        idx = np.nonzero(groups == g)[0]
        if len(idx) < 2:
            continue
        r = rewards[idx].astype(np.float64)
        c = r - r.mean()
        out[idx] = c / (r.std(ddof=1) + eps) if scale else c
    return out
