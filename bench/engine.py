"""Tokens/s of the torch engine against ``model.generate()``, and the cost of the DVP metadata.

For each dtype and batch size B, the same model (the engine's own module) decodes
B chat prompts (different lengths, left-padded; 16 distinct questions, repeated
above 16, all after the chat template's system prompt: the engine shares their
common prefix, ``--ab-prefixes`` measures it without) for N new tokens (eos ignored):

- ``generate``: ``model.generate(do_sample=True, temperature=1, top_k=0, top_p=1)``
  with a KV cache, on the stock transformers modules (``aten`` linears, ``sdpa``
  attention: the engine's fast kernels switched off for it): the baseline;
- ``engine off``: the engine with min_p = 0 and no safe ids (the rule still runs
  on the full vocabulary: every rollout gets log p, log pi_S, log Z_S, |S|);
- ``engine on``: min_p = 1e-3 and the safe ids returned (the DVP use).

Each variant runs ``--repeats`` times, interleaved (so load from other processes
hits all alike), and the median time is kept. Also reported, from the engine's
own counters in the "on" runs: the share of scheduler time spent in the rule
step (rule, sampling, log-probs, safe ids: the DVP metadata) and in bookkeeping.

The floor: a decode step must read every weight once (an untied input embedding
only in part), so ``B / (weight bytes / bandwidth)`` tokens/s is the most any
implementation gets at batch B while memory-bound; the bandwidth is measured in
this process (best of a 512 MiB fp32 sum, read only). "+KV" adds the cache read
at the mean sequence length (``B * len * 2 * layers * kv_heads * head_dim * bytes``).
At larger B the step becomes compute-bound and the floor is no longer reachable.

    .venv/bin/python bench/engine.py            # full table (SmolLM2, fp32 + bf16)
    .venv/bin/python bench/engine.py --quick    # a smoke run, under a minute
    .venv/bin/python bench/engine.py --ab-kernels   # also "engine on" with stock kernels
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
from _prompts import QUESTIONS  # bench/, next to this file
from dvp_schemas import PruningRule
from dvp_server.engines.base import EngineParams
from dvp_server.engines.torch._kernels import stock
from dvp_server.engines.torch.engine import EngineStats, TorchEngine
from dvp_server.model_store import resolve_model


@dataclass
class Row:
    dtype: str
    batch: int
    new_tokens: int
    generate_tps: float  # medians over the repeats
    off_tps: float | None  # None: not measured (--no-off)
    on_tps: float
    rule_share: float  # rule step / scheduler time, "on" runs
    emit_share: float
    floor_tps: float  # B / (weight bytes per decode step / measured bandwidth)
    floor_kv_tps: float  # the same with the KV cache read at the mean length added
    plain_tps: float | None = None  # engine on with kv_slack=0 (--ab-slack)
    stock_tps: float | None = None  # engine on with the stock kernels (--ab-kernels)
    unshared_tps: float | None = None  # engine on without prefix sharing (--ab-prefixes)


@dataclass
class Floor:
    """What one decode step must read at least, and how fast this process reads memory."""

    weight_bytes: int  # parameters read by a decode step (input embedding: only gathered)
    kv_bytes_per_token: int
    read_gbps: float  # best of a large tensor sum (read only)
    copy_gbps: float  # best of a large tensor copy (read + write, counted both)

    def step_s(self, batch: int, kv_len: float = 0.0) -> float:
        """Seconds to stream the weights (and ``batch * kv_len`` cached positions) once."""
        bytes_ = self.weight_bytes + batch * kv_len * self.kv_bytes_per_token
        return bytes_ / (self.read_gbps * 1e9)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters a decode step reads: all of them (tied ones once), less an
    untied input embedding (a step gathers B of its rows, not the whole matrix)."""
    total = sum(p.nbytes for p in model.parameters())  # parameters() lists tied ones once
    emb = model.get_input_embeddings().weight  # type: ignore[operator]
    out = model.get_output_embeddings().weight  # type: ignore[operator]
    return int(total if emb.data_ptr() == out.data_ptr() else total - emb.nbytes)


def bandwidth(nbytes: int = 512 << 20, repeats: int = 7) -> tuple[float, float]:
    """(read, copy) GB/s of this process on ``nbytes`` fp32 tensors: best of ``repeats``."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    y = torch.empty_like(x)
    read = copy = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        t1 = time.perf_counter()
        y.copy_(x)
        t2 = time.perf_counter()
        read, copy = min(read, t1 - t0), min(copy, t2 - t1)
    return nbytes / read / 1e9, 2 * nbytes / copy / 1e9


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
    with torch.inference_mode(), stock(engine.model):
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

    before = engine.stats.prefills
    dt = asyncio.run(run())
    assert engine.stats.prefills == before + 1, "rows were split over prefills"
    return dt


def measure(
    engine: TorchEngine,
    floor: Floor,
    b: int,
    new: int,
    repeats: int,
    off: bool,
    ab: bool,
    ab_kernels: bool = False,
    ab_prefixes: bool = False,
) -> Row:
    """Interleaved runs of generate() / engine off / engine on (/ on with the plain
    concatenating KV cache when ``ab`` / on with the stock kernels when
    ``ab_kernels``); medians of each."""
    batch = prompts(engine, b)
    time_generate(engine, batch, min(new, 16))  # warm-up: kernels for these shapes
    time_engine(engine, batch, min(new, 16), True)
    gen, offs, on, plain, stocks, unshared = [], [], [], [], [], []
    stats = EngineStats()
    slack = engine.kv.slack
    for _ in range(repeats):
        gen.append(time_generate(engine, batch, new))
        if off:
            offs.append(time_engine(engine, batch, new, False))
        if ab:
            engine.kv.slack = 0
            try:
                plain.append(time_engine(engine, batch, new, True))
            finally:
                engine.kv.slack = slack
        if ab_kernels:
            with stock(engine.model):
                stocks.append(time_engine(engine, batch, new, True))
        if ab_prefixes:
            prefixes, engine.prefixes = engine.prefixes, None
            try:
                unshared.append(time_engine(engine, batch, new, True))
            finally:
                engine.prefixes = prefixes
        if engine.prefixes is not None:
            engine.prefixes.clear()  # every run computes its shared prefix again
        engine.stats = EngineStats()
        on.append(time_engine(engine, batch, new, True))
        stats = _add(stats, engine.stats)
    total = stats.forward_s + stats.rule_s + stats.emit_s
    tokens = b * new
    mean_len = statistics.fmean(len(p) for p in batch) + new / 2
    return Row(
        dtype=str(engine.info.dtype),
        batch=b,
        new_tokens=new,
        generate_tps=tokens / statistics.median(gen),
        off_tps=tokens / statistics.median(offs) if offs else None,
        on_tps=tokens / statistics.median(on),
        rule_share=stats.rule_s / total,
        emit_share=stats.emit_s / total,
        floor_tps=b / floor.step_s(b),
        floor_kv_tps=b / floor.step_s(b, mean_len),
        plain_tps=tokens / statistics.median(plain) if plain else None,
        stock_tps=tokens / statistics.median(stocks) if stocks else None,
        unshared_tps=tokens / statistics.median(unshared) if unshared else None,
    )


def _add(a: EngineStats, b: EngineStats) -> EngineStats:
    return EngineStats(**{k: getattr(a, k) + getattr(b, k) for k in vars(a)})


def table(rows: list[Row]) -> str:
    lines = [
        "| dtype | batch | new | generate() tok/s | engine on tok/s | on / generate "
        "| metadata cost (on vs off) | rule step share | bookkeeping share "
        "| floor tok/s (weights) | on / floor | floor tok/s (+KV) | on, plain KV cache "
        "| on, stock kernels | on, no prefix sharing |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cost = "n/a" if r.off_tps is None else f"{100 * (1 - r.on_tps / r.off_tps):+.1f}%"
        lines.append(
            f"| {r.dtype} | {r.batch} | {r.new_tokens} | {r.generate_tps:.1f} | {r.on_tps:.1f} "
            f"| {r.on_tps / r.generate_tps:.2f}x | {cost} "
            f"| {100 * r.rule_share:.1f}% | {100 * r.emit_share:.1f}% "
            f"| {r.floor_tps:.0f} | {r.on_tps / r.floor_tps:.2f} | {r.floor_kv_tps:.0f} "
            f"| {'n/a' if r.plain_tps is None else f'{r.plain_tps:.1f}'} "
            f"| {'n/a' if r.stock_tps is None else f'{r.stock_tps:.1f}'} "
            f"| {'n/a' if r.unshared_tps is None else f'{r.unshared_tps:.1f}'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="model spec for resolve_model (default SmolLM2)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--new-tokens", nargs="+", type=int, default=[64, 256])
    ap.add_argument("--repeats", type=int, default=3, help="runs per variant (median kept)")
    ap.add_argument("--long-repeats", type=int, default=1, help="runs for more than 64 tokens")
    ap.add_argument("--no-off", action="store_true", help="skip the 'engine off' variant")
    ap.add_argument(
        "--ab-slack", action="store_true", help="also 'engine on' with kv_slack=0 (A/B)"
    )
    ap.add_argument(
        "--ab-kernels", action="store_true", help="also 'engine on' with the stock kernels (A/B)"
    )
    ap.add_argument(
        "--ab-prefixes", action="store_true", help="also 'engine on' without prefix sharing"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    ap.add_argument("--quick", action="store_true", help="batches 1 8, 16 tokens, 1 repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.new_tokens, args.repeats = [1, 8], [16], 1
    path = resolve_model(args.model)
    rows: list[Row] = []
    floors: list[str] = []
    for dtype in args.dtypes:
        engine = TorchEngine(path, dtype=dtype, max_batch=max(args.batches), threads=args.threads)
        read, copy = bandwidth()
        floor = Floor(weight_bytes(engine.model), engine.kv.bytes_per_token, read, copy)
        floors.append(
            f"{dtype}: weights read per decode step {floor.weight_bytes / 2**20:.1f} MiB, "
            f"KV {floor.kv_bytes_per_token} B/token/sequence; bandwidth (same process) "
            f"read {read:.1f} GB/s, copy {copy:.1f} GB/s; floor {1e3 * floor.step_s(1):.1f} ms/step"
        )
        print(floors[-1], flush=True)
        asyncio.run(engine.start())
        try:
            for new in args.new_tokens:
                reps = args.repeats if new <= 64 else args.long_repeats
                for b in args.batches:
                    off = not args.no_off
                    ab = (args.ab_slack, args.ab_kernels, args.ab_prefixes)
                    rows.append(measure(engine, floor, b, new, reps, off, *ab))
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
        finally:
            asyncio.run(engine.shutdown())
    print()
    print(
        f"model {engine.info.model_id}, medians of {args.repeats} (64 tokens or fewer) / "
        f"{args.long_repeats} (more), torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"load average at end {statistics.fmean(os.getloadavg()):.1f}"
    )
    print("\n".join(floors))
    print(table(rows))


if __name__ == "__main__":
    main()
