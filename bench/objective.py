"""Benchmark: pruned_logprobs forward+backward against the naive masked log-softmax.

Baseline (same inputs, same run)::

    u = logits.float() / T                         # the bf16 variant upcasts, as we do
    logp = u.masked_fill(~mask, -inf).log_softmax(-1).gather(-1, y[..., None])

Ours: ``dvp_client.train.objective.pruned_logprobs`` with the safe sets as CSR (what
``RolloutBatch.to_torch`` gives), computing also the full ``log p(y)`` and
``log Z_S`` (its default: one dense pass over the logits in forward) or, like
the baseline, only ``log pi_S(y)`` (``with_full=False``: a sparse forward); and
with the same dense bool mask the baseline uses (converted to CSR inside).
Each computes ``loss = sum(w * logp)`` with fixed random weights ``w`` and calls
``backward()`` on float logits that require grad.

Measured:
- time: wall clock of forward+backward (``time.perf_counter``), ``--repeat``
  rounds after a warm-up round, each round running every method once
  (round-robin, so load from other processes hits all alike); the speed-up is
  the median over rounds of (naive time / our time) in the same round.
- extra peak memory: torch profiler memory events (``profile_memory=True``):
  the peak of the running sum of every allocation minus every free, in time
  order, inside one forward+backward. Tensors that exist before (logits, mask,
  sets) are not counted; the logits gradient (same size as the logits) is.
- values: max |ours - naive| of the log-probs and of the gradients.

Usage::

    .venv/bin/python bench/objective.py            # [4, 512, 49152], fp32 and bf16
    .venv/bin/python bench/objective.py --quick    # [2, 128, 49152]
    .venv/bin/python bench/objective.py --head     # from hidden states: bench/_head.py
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _measure import MIN_P, TEMPERATURE, extra_peak_bytes, time_rounds
from dvp_client.train.objective import pruned_logprobs
from dvp_client.train.rule import safe_mask
from dvp_client.train.tensors import SafeSets
from torch import Tensor


@dataclass
class Case:
    """Inputs of one benchmark case."""

    logits: Tensor  # [B, T, V]
    tokens: Tensor  # [B, T] int64
    mask: Tensor  # [B, T, V] bool
    sets: SafeSets
    weights: Tensor  # [B, T] float32


def make_case(b: int, t: int, v: int, dtype: torch.dtype, seed: int = 0) -> Case:
    """LLM-like logits: a N(0, 2^2) background plus 32 plausible tokens per step at N(8, 2^2)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 2.0
    top = torch.randint(0, v, (b, t, 32), generator=g)
    logits.scatter_(-1, top, 8.0 + 2.0 * torch.randn(b, t, 32, generator=g))
    logits = logits.to(dtype)
    mask = safe_mask(logits, temperature=TEMPERATURE, min_p=MIN_P)
    probs = torch.softmax(logits.float() / TEMPERATURE, -1).masked_fill_(~mask, 0.0)
    tokens = torch.multinomial(probs.view(-1, v), 1, generator=g).view(b, t)
    del probs
    sets = SafeSets.from_mask(mask, temperature=TEMPERATURE)
    weights = torch.randn(b, t, generator=g)
    return Case(logits, tokens, mask, sets, weights)


def naive(c: Case, logits: Tensor) -> Tensor:
    u = logits.float() / TEMPERATURE
    logp = u.masked_fill(~c.mask, -math.inf).log_softmax(-1)
    return logp.gather(-1, c.tokens.unsqueeze(-1)).squeeze(-1)


def ours_csr(c: Case, logits: Tensor) -> Tensor:
    return pruned_logprobs(logits, c.tokens, c.sets, TEMPERATURE).logprobs


def ours_csr_masked_only(c: Case, logits: Tensor) -> Tensor:
    return pruned_logprobs(logits, c.tokens, c.sets, TEMPERATURE, with_full=False).logprobs


def ours_dense(c: Case, logits: Tensor) -> Tensor:
    return pruned_logprobs(logits, c.tokens, c.mask, TEMPERATURE).logprobs


Fn = Callable[[Case, Tensor], Tensor]


def step(fn: Fn, c: Case) -> tuple[Tensor, Tensor]:
    """One forward+backward; returns (log-probs, logits gradient)."""
    x = c.logits.detach().requires_grad_(True)
    logp = fn(c, x)
    (logp * c.weights).sum().backward()
    assert x.grad is not None
    return logp.detach(), x.grad


def run(shape: tuple[int, int, int], dtype: torch.dtype, repeat: int) -> None:
    c = make_case(*shape, dtype=dtype)
    sizes = c.sets.sizes().float()
    mib = 2.0**20
    print(
        f"\n== logits {list(shape)} {str(dtype).removeprefix('torch.')} "
        f"({c.logits.numel() * c.logits.element_size() / mib:.0f} MiB), T={TEMPERATURE}, "
        f"min_p={MIN_P}: |S| mean {sizes.mean():.0f}, max {sizes.max():.0f}"
    )
    ref_logp, ref_grad = step(naive, c)
    rows: list[tuple[str, Fn]] = [
        ("naive masked_fill+log_softmax+gather", naive),
        ("pruned_logprobs, CSR sets", ours_csr),
        ("  same, with_full=False", ours_csr_masked_only),
        ("pruned_logprobs, dense bool mask", ours_dense),
    ]
    times = time_rounds([functools.partial(step, fn, c) for _, fn in rows], repeat)
    base_m = extra_peak_bytes(functools.partial(step, naive, c))
    for (name, fn), ts in zip(rows, times, strict=True):
        m = extra_peak_bytes(functools.partial(step, fn, c))
        logp, grad = step(fn, c)
        dv = (logp - ref_logp).abs().max().item()
        dg = (grad.float() - ref_grad.float()).abs().max().item()
        speedup = statistics.median(a / b for a, b in zip(times[0], ts, strict=True))  # per round
        print(
            f"{name:38s} median {statistics.median(ts) * 1e3:6.0f} ms (min {min(ts) * 1e3:5.0f})"
            f"  speed-up x{speedup:4.2f}   extra peak {m / mib:6.0f} MiB"
            f" ({m / base_m:4.2f} of naive)   max|dlogp| {dv:.1e}  max|dgrad| {dg:.1e}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shape [2, 128, 49152]")
    ap.add_argument("--shape", type=int, nargs=3, metavar=("B", "T", "V"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument(
        "--head",
        type=int,
        nargs="*",
        metavar="V",
        help="LM-head comparison from hidden states [4, 1024, 576] instead "
        "(bench/_head.py); V values, default 49152 151936",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.head is not None:
        from _head import run_head

        shape = tuple(args.shape[:2]) if args.shape else (4, 1024)
        for v in args.head or [49152, 151936]:
            run_head((*shape, 576, v), args.repeat)  # type: ignore[arg-type]
        return
    default = (2, 128, 49152) if args.quick else (4, 512, 49152)
    shape = tuple(args.shape) if args.shape else default
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    dtypes = {"fp32": [torch.float32], "bf16": [torch.bfloat16]}.get(
        args.dtype, [torch.float32, torch.bfloat16]
    )
    for dt in dtypes:
        run(shape, dt, args.repeat)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
