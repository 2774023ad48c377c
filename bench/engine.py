"""Tokens/s of the torch engine against ``model.generate()``, and the cost of the DVP metadata.

For each dtype and batch size B, the same model (the engine's own module) decodes
B chat prompts (different lengths, left-padded) for N new tokens (eos ignored):

- ``generate``: ``model.generate(do_sample=True, temperature=1, top_k=0, top_p=1)``
  with a KV cache: the baseline;
- ``engine off``: the engine with min_p = 0 and no safe ids (the rule still runs
  on the full vocabulary: every rollout gets log p, log pi_S, log Z_S, |S|);
- ``engine on``: min_p = 1e-3 and the safe ids returned (the DVP use).

Each variant runs ``--repeats`` times, interleaved (so load from other processes
hits all alike), and the best time is kept. Also reported, from the engine's
own counters in the "on" runs: the share of scheduler time spent in the rule
step (rule, sampling, log-probs, safe ids) and in bookkeeping.

    .venv/bin/python bench/engine.py            # full table (SmolLM2, fp32 + bf16)
    .venv/bin/python bench/engine.py --quick    # a smoke run, under a minute
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch
from dvp_schemas import PruningRule
from dvp_server.engines.base import EngineParams
from dvp_server.engines.torch_engine import EngineStats, TorchEngine
from dvp_server.model_store import resolve_model

QUESTIONS = [
    "What is 7*8?",
    "Name three primary colours.",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "What is the capital of France?",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water in Celsius?",
    "List two prime numbers greater than ten.",
    "Who wrote Romeo and Juliet?",
    "What does CPU stand for?",
    "Describe a cat in five words.",
    "What is the square root of 144?",
    "Suggest a name for a pet goldfish.",
    "Why is the sky blue? Answer briefly, please, in plain words.",
]


@dataclass
class Row:
    dtype: str
    batch: int
    generate_tps: float
    off_tps: float
    on_tps: float
    rule_share: float  # rule step / scheduler time, "on" runs
    emit_share: float


def prompts(engine: TorchEngine, batch: int) -> list[list[int]]:
    tok = engine.tokenizer
    out = []
    for i in range(batch):
        msgs = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        out.append(list(tok.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"]))
    return out


def time_generate(engine: TorchEngine, batch: list[list[int]], new: int) -> float:
    """Seconds for ``model.generate`` on the left-padded batch."""
    k = max(len(p) for p in batch)
    ids = torch.full((len(batch), k), engine.pad_id, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(batch):
        ids[i, k - len(p) :] = torch.tensor(p)
        mask[i, k - len(p) :] = 1
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = engine.model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new,
            min_new_tokens=new,  # no early eos: the same work as the engine
            pad_token_id=engine.pad_id,
        )
    dt = time.perf_counter() - t0
    assert out.shape[1] == k + new, out.shape
    return dt


def time_engine(engine: TorchEngine, batch: list[list[int]], new: int, dvp: bool) -> float:
    """Seconds for the engine to decode the batch (all rows admitted as one batch)."""
    rule = PruningRule(min_p=1e-3 if dvp else 0.0)

    async def run() -> float:
        ps = [
            EngineParams(temperature=1.0, max_tokens=new, rule=rule, seed=i, ignore_eos=True,
                         return_safe_token_ids=dvp)
            for i in range(len(batch))
        ]  # fmt: skip

        async def one(i: int) -> int:
            n = 0
            async for c in engine.generate(f"bench-{i}", batch[i], ps[i]):
                n += len(c.token_ids)
            return n

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(len(batch))))
        dt = time.perf_counter() - t0
        assert counts == [new] * len(batch), counts
        return dt

    batches_before = engine.stats.batches
    dt = asyncio.run(run())
    assert engine.stats.batches == batches_before + 1, "rows were split over batches"
    return dt


def measure(engine: TorchEngine, b: int, new: int, repeats: int) -> Row:
    batch = prompts(engine, b)
    time_generate(engine, batch, new)  # warm-up: kernels for these shapes
    time_engine(engine, batch, new, True)
    gen, off, on = [], [], []
    stats = EngineStats()
    for _ in range(repeats):
        gen.append(time_generate(engine, batch, new))
        off.append(time_engine(engine, batch, new, False))
        engine.stats = EngineStats()
        on.append(time_engine(engine, batch, new, True))
        stats = _add(stats, engine.stats)
    total = stats.forward_s + stats.rule_s + stats.emit_s
    tokens = b * new
    return Row(
        dtype=str(engine.info.dtype),
        batch=b,
        generate_tps=tokens / min(gen),
        off_tps=tokens / min(off),
        on_tps=tokens / min(on),
        rule_share=stats.rule_s / total,
        emit_share=stats.emit_s / total,
    )


def _add(a: EngineStats, b: EngineStats) -> EngineStats:
    return EngineStats(**{k: getattr(a, k) + getattr(b, k) for k in vars(a)})


def table(rows: list[Row]) -> str:
    lines = [
        "| dtype | batch | generate() tok/s | engine off tok/s | engine on tok/s "
        "| on / generate | metadata cost (on vs off) | rule step share | bookkeeping share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cost = 1 - r.on_tps / r.off_tps
        lines.append(
            f"| {r.dtype} | {r.batch} | {r.generate_tps:.1f} | {r.off_tps:.1f} | {r.on_tps:.1f} "
            f"| {r.on_tps / r.generate_tps:.2f}x | {100 * cost:+.1f}% "
            f"| {100 * r.rule_share:.1f}% | {100 * r.emit_share:.1f}% |"
        )
    return "\n".join(lines)


def fastest(rows: list[Row]) -> str:
    out = []
    for b in sorted({r.batch for r in rows}):
        rs = sorted((r for r in rows if r.batch == b), key=lambda r: -r.on_tps)
        ratio = " / ".join(f"{r.dtype} {r.on_tps:.1f}" for r in rs)
        out.append(f"- batch {b}: fastest {rs[0].dtype} (engine on, tok/s: {ratio})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="model spec for resolve_model (default SmolLM2)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    ap.add_argument("--quick", action="store_true", help="batches 1 8, 16 tokens, 1 repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.new_tokens, args.repeats = [1, 8], 16, 1
    path = resolve_model(args.model)
    rows: list[Row] = []
    for dtype in args.dtypes:
        engine = TorchEngine(path, dtype=dtype, max_batch=max(args.batches), threads=args.threads)
        asyncio.run(engine.start())
        try:
            for b in args.batches:
                rows.append(measure(engine, b, args.new_tokens, args.repeats))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
        finally:
            asyncio.run(engine.shutdown())
    print()
    print(
        f"model {engine.info.model_id}, {args.new_tokens} new tokens, best of {args.repeats}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"load average at end {statistics.fmean(os.getloadavg()):.1f}"
    )
    print(table(rows))
    print()
    print(fastest(rows))


if __name__ == "__main__":
    main()
