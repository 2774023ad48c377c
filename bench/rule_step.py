"""The torch engine's rule step: the sparse min-p path against the dense rule.

One rule step (the rule, one seeded draw per row, log-probs, |S|, log Z_S and the
ids of S, as the engine returns them) on SmolLM2's real next-token logits for the
bench's chat prompts, batch B, ``min_p = 1e-3``, T = 1. Two paths, interleaved in
one process, best of ``--repeats`` means: ``dense`` (``rule.safe_vocab`` over the
full ``(B, V)`` mask: what every step did before the sparse path) and ``sparse``
(``rule_sparse.sparse_safe_vocab``: S as id lists). Both give the same sets and
tokens (checked here on every run). Two samplers without any DVP output, to say
what the metadata itself costs: ``plain``, what ``generate()`` does per step
(``softmax`` then ``multinomial``), and ``minimal``, the least a sampler over the
full softmax does (row max, ``exp(u - max)``, one cumulative sum, one search per
row): the DVP metadata costs ``sparse - minimal`` of a step.

    .venv/bin/python bench/rule_step.py                 # batches 1 16 64, 1 thread
    .venv/bin/python bench/rule_step.py --batches 64 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from dataclasses import replace

import numpy as np
import torch
from dvp_schemas import PruningRule
from dvp_server.engines.base import EngineParams
from dvp_server.engines.torch._batch import DecodeBatch
from dvp_server.engines.torch._rows import Row
from dvp_server.engines.torch._rule_step import BatchRule, rule_step
from dvp_server.engines.torch.engine import TorchEngine
from dvp_server.model_store import resolve_model
from engine import prompts  # bench/, next to this file


def logits_for(engine: TorchEngine, batch: int) -> torch.Tensor:
    """Last-position logits ``(B, V)`` of the bench prompts (one prefill)."""
    rows = [Row(f"p{i}", p, _params(i), *_delivery()) for i, p in enumerate(prompts(engine, batch))]
    with torch.inference_mode():
        return DecodeBatch(engine.model, rows, engine.pad_id).prefill().contiguous()


def _params(seed: int) -> EngineParams:
    return EngineParams(temperature=1.0, max_tokens=1, rule=PruningRule(min_p=1e-3), seed=seed,
                        return_safe_token_ids=True)  # fmt: skip


_LOOP = asyncio.new_event_loop()


def _delivery() -> tuple[asyncio.AbstractEventLoop, asyncio.Queue, frozenset[int], None]:
    return _LOOP, asyncio.Queue(), frozenset(), None


def minimal_sample(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One draw per row from softmax(logits) by inverse CDF, nothing else; int64 ``(B,)``."""
    w = torch.exp(logits - torch.amax(logits, dim=-1, keepdim=True))  # (B, V)
    cdf = torch.cumsum(w, dim=-1)
    target = torch.rand(w.shape[0], 1, generator=gen) * cdf[:, -1:]
    return torch.searchsorted(cdf, target).squeeze(-1).clamp(max=w.shape[1] - 1)


def mean_ms(logits: torch.Tensor, rule: BatchRule | str, steps: int) -> float:
    """Mean ms of a rule step (``rule``), or of the ``"plain"`` / ``"minimal"`` sampler."""
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        if rule == "plain":
            torch.multinomial(torch.softmax(logits.float(), dim=-1), 1, generator=gen).numpy()
        elif rule == "minimal":
            minimal_sample(logits, gen).numpy()
        else:
            assert isinstance(rule, BatchRule)
            rule_step(logits, rule.rows, rule)
    return (time.perf_counter() - t0) / steps * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="rule steps per timed run")
    args = ap.parse_args(argv)
    engine = TorchEngine(resolve_model(None), max_batch=max(args.batches), threads=args.threads)
    print(
        "| batch | mean S | plain sampling ms | minimal sampling ms | dense rule step ms "
        "| sparse rule step ms | sparse / dense | sparse - minimal ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in args.batches:
        logits = logits_for(engine, b)
        rows = [Row(f"r{i}", [1], _params(i), *_delivery()) for i in range(b)]
        sparse = BatchRule.of(rows)
        assert sparse.sparse, "the bench rows must take the sparse path"
        dense = replace(sparse, sparse=False)
        a, c = rule_step(logits, rows, sparse), rule_step(logits, rows, dense)
        assert np.array_equal(a.sizes, c.sizes), "the paths disagree on |S|"
        variants: dict[str, BatchRule | str] = {
            "plain": "plain", "minimal": "minimal", "dense": dense, "sparse": sparse
        }  # fmt: skip
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.repeats):
            for k, v in variants.items():
                times[k].append(mean_ms(logits, v, args.steps))
        p, m, d, s = (min(times[k]) for k in variants)
        size = statistics.fmean(a.sizes.tolist())
        print(
            f"| {b} | {size:.0f} | {p:.2f} | {m:.2f} | {d:.2f} | {s:.2f} | {s / d:.2f} "
            f"| {s - m:+.2f} |"
        )
    print(
        f"\nSmolLM2 logits, min_p 1e-3, T 1, ids returned; best of {args.repeats} means of "
        f"{args.steps} steps; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), load average "
        f"at end {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
