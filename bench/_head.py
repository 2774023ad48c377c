"""LM-head benchmark for bench/objective.py --head: log-probs from hidden states.

Inputs: hidden states ``[B, T, H]`` and an LM head ``(V, H)``, float32, both leaves that
require grad; tokens sampled from the DVP distribution (min-p ``MIN_P`` at
``TEMPERATURE``); the safe sets as CSR (what ``RolloutBatch.to_torch`` gives). Each
method computes per-token log-probs, ``loss = sum(w * logp)`` with fixed random
weights, and ``backward()`` into both leaves:

(a) naive:  ``F.linear(hidden, W) / T``, ``log_softmax``, ``gather`` (full vocabulary)
(b) ``F.linear(hidden, W)`` then ``pruned_logprobs`` (CSR sets, default with_full=True)
(c) ``pruned_logprobs_from_hidden`` (the fused pruned head; default with_full=True),
    and the same with ``with_full=False``
(d) TRL's fused head: ``trl.kernels.ChunkedLogProbFunction`` (what
    ``trl.trainer.utils.add_fused_lm_head`` applies, with TRL's vocabulary chunk
    ``_CHUNKED_LOGPROB_CHUNK_SIZE``; full vocabulary, no pruning), when trl imports

Time and extra peak memory are measured as in bench/objective.py (round-robin rounds;
profiler memory events; the gradients of the hidden states and of the weight are
counted, the inputs are not). (a) and (d) give ``log p(y)``; (b) and (c) give
``log pi_S(y)`` (compared with each other) and ``log p(y)`` (compared with (a)).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from _measure import MIN_P, TEMPERATURE, extra_peak_bytes, time_rounds
from dvp_client.train.fused_head import pruned_logprobs_from_hidden
from dvp_client.train.objective import pruned_logprobs
from dvp_client.train.rule import safe_mask
from dvp_client.train.tensors import SafeSets
from torch import Tensor

# Logit scale: N(0, 4^2) logits keep ~150 (V = 49152) to ~450 (V = 151936) tokens at
# min-p 1e-3, T = 0.9, the order of |S| measured on SmolLM2 rollouts.
LOGIT_STD = 4.0


@dataclass
class HeadCase:
    hidden: Tensor  # [B, T, H] float32
    weight: Tensor  # (V, H) float32
    tokens: Tensor  # [B, T] int64
    sets: SafeSets
    w: Tensor  # [B, T] loss weights


def make_head_case(b: int, t: int, h: int, v: int, seed: int = 0) -> HeadCase:
    """Random hidden states and head; sets and tokens from the logits, 256 steps at a time."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (LOGIT_STD / h**0.5)
    masks, ys = [], []
    with torch.no_grad():
        flat = hidden.view(-1, h)
        for r0 in range(0, b * t, 256):
            z = flat[r0 : r0 + 256] @ weight.t()
            m = safe_mask(z, temperature=TEMPERATURE, min_p=MIN_P)
            p = torch.softmax(z / TEMPERATURE, -1).masked_fill_(~m, 0.0)
            ys.append(torch.multinomial(p, 1, generator=g).squeeze(-1))
            masks.append(SafeSets.from_mask(m[None]))
    offsets, ids = [torch.zeros(1, dtype=torch.int64)], []
    for s in masks:
        assert s.offsets is not None and s.ids is not None
        offsets.append(s.offsets[1:] + offsets[-1][-1])
        ids.append(s.ids)
    sets = SafeSets(
        shape=(b, t),
        offsets=torch.cat(offsets),
        ids=torch.cat(ids),
        temperature=TEMPERATURE,
    )
    tokens = torch.cat(ys).view(b, t)
    return HeadCase(hidden, weight, tokens, sets, torch.randn(b, t, generator=g))


HeadFn = Callable[[HeadCase, Tensor, Tensor], Tensor]


def naive(c: HeadCase, x: Tensor, w: Tensor) -> Tensor:
    logp = (F.linear(x, w) / TEMPERATURE).log_softmax(-1)
    return logp.gather(-1, c.tokens.unsqueeze(-1)).squeeze(-1)


def head_then_pruned(c: HeadCase, x: Tensor, w: Tensor) -> Tensor:
    return pruned_logprobs(F.linear(x, w), c.tokens, c.sets).logprobs


def fused(c: HeadCase, x: Tensor, w: Tensor) -> Tensor:
    return pruned_logprobs_from_hidden(x, w, c.tokens, c.sets).logprobs


def fused_masked_only(c: HeadCase, x: Tensor, w: Tensor) -> Tensor:
    return pruned_logprobs_from_hidden(x, w, c.tokens, c.sets, with_full=False).logprobs


def trl_fused(c: HeadCase, x: Tensor, w: Tensor) -> Tensor:
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    out = ChunkedLogProbFunction.apply(
        x.reshape(-1, x.shape[-1]),
        w,
        None,
        c.tokens.reshape(-1),
        TEMPERATURE,
        _CHUNKED_LOGPROB_CHUNK_SIZE,
        None,
        1.0,
        ("log_probs",),
    )
    return out[0].view(c.tokens.shape)


def head_step(fn: HeadFn, c: HeadCase) -> tuple[Tensor, Tensor, Tensor]:
    """One forward+backward; returns (log-probs, hidden gradient, weight gradient)."""
    x = c.hidden.detach().requires_grad_(True)
    w = c.weight.detach().requires_grad_(True)
    logp = fn(c, x, w)
    (logp * c.w).sum().backward()
    assert x.grad is not None and w.grad is not None
    return logp.detach(), x.grad, w.grad


def _has_trl() -> bool:
    try:
        import trl.kernels  # noqa: F401
    except ImportError:
        return False
    return True


def run_head(shape: tuple[int, int, int, int], repeat: int) -> None:
    b, t, h, v = shape
    c = make_head_case(b, t, h, v)
    sizes = c.sets.sizes().float()
    mib = 2.0**20
    print(
        f"\n== hidden {[b, t, h]}, V={v} float32 (logits would be "
        f"{b * t * v * 4 / mib:.0f} MiB), T={TEMPERATURE}, min_p={MIN_P}: "
        f"|S| mean {sizes.mean():.0f}, max {sizes.max():.0f}",
        flush=True,
    )
    rows: list[tuple[str, HeadFn]] = [
        ("(a) naive linear+log_softmax+gather", naive),
        ("(b) linear + pruned_logprobs", head_then_pruned),
        ("(c) pruned_logprobs_from_hidden", fused),
        ("    same, with_full=False", fused_masked_only),
    ]
    if _has_trl():
        rows.append(("(d) TRL ChunkedLogProbFunction", trl_fused))
    runs = [functools.partial(head_step, fn, c) for _, fn in rows]
    times = time_rounds(runs, repeat) if repeat > 0 else [[] for _ in rows]
    results: list[tuple[Tensor, Tensor, Tensor]] = []
    peaks = []
    for i, (_, fn) in enumerate(rows):
        t0 = time.perf_counter()
        peaks.append(extra_peak_bytes(functools.partial(_keep, results, fn, c)))
        if repeat == 0:  # --repeat 0: one profiled run per method, its time (profiler on)
            times[i].append(time.perf_counter() - t0)
    for i, ((name, fn), ts, m) in enumerate(zip(rows, times, peaks, strict=True)):
        lp, gx, gw = results[i]
        base = results[0] if fn in (naive, trl_fused) else results[1]
        dv = (lp - base[0]).abs().max().item()
        dg = max((gx - base[1]).abs().max().item(), (gw - base[2]).abs().max().item())
        vs_b = statistics.median(a / b for a, b in zip(times[1], ts, strict=True))
        print(
            f"{name:37s} median {statistics.median(ts):6.2f} s (min {min(ts):5.2f})"
            f"  (b)/this x{vs_b:4.2f}   extra peak {m / mib:6.0f} MiB"
            f" ({m / peaks[0]:5.3f} of (a)"
            + (f", {m / peaks[-1]:4.2f} of (d))" if rows[-1][1] is trl_fused else ")")
            + f"   max|dlogp| {dv:.1e} max|dgrad| {dg:.1e}",
            flush=True,
        )


def _keep(out: list[tuple[Tensor, Tensor, Tensor]], fn: HeadFn, c: HeadCase) -> None:
    """One forward+backward, its results appended to ``out`` (measured and compared once)."""
    out.append(head_step(fn, c))
