"""Tokens/s of our vLLM engine (exact safe sets) against plain vLLM and HF ``generate()``.

Same model (SmolLM2-135M-Instruct, fp32, CPU), same prompts (B chat prompts of
different lengths), 64 new tokens with eos ignored, one seeded n=1 request per
rollout, sampling rule ``min_p = 1e-3`` alone (no top_k):

- ``vllm``: plain ``AsyncLLM.generate`` on the same engine with vLLM's own
  ``min_p``, ``logprobs=0``, ``detokenize=False``, ``FINAL_ONLY`` output (the
  cheapest plain use; it returns no set);
- ``ours, sets``: :class:`VllmEngine.generate` with the safe ids returned: the
  rule applied in vLLM's sampler by our logits processor, every full min-p set
  shipped to the API process and joined into chunks every 16 steps;
- ``ours, no ids``: the same without the ids (``|S|``, log Z_S, log-probs still
  computed): "sets / no ids" is the cost of extracting and shipping the sets;
- ``HF generate``: ``model.generate(do_sample, min_p=1e-3)``, run in the same
  process before the vLLM engine starts (the cores are then free).

Variants run interleaved ``--repeats`` rounds (load from other processes hits all
alike); the best time is kept, and each ratio is the median over rounds of the
ratio of the two runs made back to back in that round.

    .venv/bin/python bench/vllm_engine.py              # the BENCHMARKS.md table
    .venv/bin/python bench/vllm_engine.py --quick      # smoke run, ~2 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from typing import Any

from _prompts import QUESTIONS  # bench/, next to this file

MIN_P = 1e-3


def chat_prompts(tokenizer: Any, batch: int) -> list[list[int]]:
    out = []
    for i in range(batch):
        msgs = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        out.append(list(tokenizer.encode(text, add_special_tokens=False)))  # as the server does
    return out


def time_hf_generate(model_dir: Any, batches: list[int], new: int, reps: int, threads: int) -> dict:
    """Best seconds of HF ``generate`` per batch size, fp32, ``threads`` torch threads."""
    import torch
    from dvp_server.model_store import load_tokenizer
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    best: dict[int, float] = {}
    for b in batches:
        prompts = chat_prompts(tok, b)
        width = max(map(len, prompts))
        ids = torch.full((b, width), pad, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
        for rep in range(reps + 1):  # run 0 warms up
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=True,
                    temperature=1.0,
                    min_p=MIN_P,
                    top_k=0,  # no cap (transformers' default is 50)
                    top_p=1.0,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    pad_token_id=pad,
                )
            dt = time.perf_counter() - t0
            assert out.shape[1] == width + new
            if rep:
                best[b] = min(best.get(b, dt), dt)
            print(f"HF generate batch {b}: {b * new / dt:.1f} tok/s", flush=True)
    return best


async def run_plain(llm: Any, prompts: list[list[int]], new: int) -> float:
    """Seconds for plain vLLM to decode the batch (one seeded n=1 request per prompt)."""
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    async def one(i: int) -> int:
        sp = SamplingParams(
            n=1,
            temperature=1.0,
            min_p=MIN_P,
            seed=i,
            max_tokens=new,
            ignore_eos=True,
            logprobs=0,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = None
        stream = llm.generate(TokensPrompt(prompt_token_ids=prompts[i]), sp, f"plain-{i}")
        async for out in stream:
            final = out
        assert final is not None
        return len(final.outputs[0].token_ids)

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    assert counts == [new] * len(prompts), counts
    return time.perf_counter() - t0


async def run_ours(
    engine: Any, prompts: list[list[int]], new: int, with_ids: bool, sizes: list[int]
) -> float:
    """Seconds for our engine to decode the batch (``sizes`` gets every |S|)."""
    from dvp_schemas import PruningRule
    from dvp_server.engines.base import EngineParams

    rule = PruningRule(min_p=MIN_P)

    async def one(i: int) -> int:
        p = EngineParams(
            temperature=1.0,
            max_tokens=new,
            rule=rule,
            seed=i,
            ignore_eos=True,
            return_safe_token_ids=with_ids,
        )
        n = 0
        async for c in engine.generate(f"ours-{i}-{with_ids}", prompts[i], p):
            n += len(c.token_ids)
            sizes.extend(c.safe_sizes.tolist())
        return n

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    assert counts == [new] * len(prompts), counts
    return time.perf_counter() - t0


def timed(fn: Callable[..., Any], acc: list[float]) -> Callable[..., Any]:
    """Wrap ``fn`` so that its wall time adds to ``acc[0]``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[0] += time.perf_counter() - t0

    return wrapper


async def bench_vllm(model_dir: Any, batches: list[int], new: int, reps: int):
    from dvp_server.engines.vllm.engine import VllmEngine, VllmSettings
    from dvp_server.model_store import load_tokenizer

    engine = VllmEngine(model_dir, VllmSettings(max_num_seqs=64))
    t0 = time.perf_counter()
    await engine.start()
    startup = time.perf_counter() - t0
    tok = load_tokenizer(model_dir)
    best: dict[tuple[str, int], float] = defaultdict(lambda: 1e9)
    times: dict[tuple[str, int], list[float]] = defaultdict(list)
    sizes: list[int] = []
    try:
        for b in batches:
            prompts = chat_prompts(tok, b)
            variants = _variants(engine, prompts, new, sizes)
            for _, make in variants:  # warm-up
                await make()
            for _ in range(reps):
                for name, make in variants:
                    dt = await make()
                    print(f"{name} batch {b}: {b * new / dt:.1f} tok/s", flush=True)
                    times[(name, b)].append(dt)
                    best[(name, b)] = min(best[(name, b)], dt)
    finally:
        await engine.shutdown()
    return best, startup, times, sizes


VARIANTS = ("vllm", "ours, sets", "ours, no ids")


def _variants(engine: Any, prompts: list[list[int]], new: int, sizes: list[int]) -> list:
    """(name, coroutine factory) of every variant for one batch of prompts."""
    return [
        ("vllm", partial(run_plain, engine._llm, prompts, new)),
        ("ours, sets", partial(run_ours, engine, prompts, new, True, sizes)),
        ("ours, no ids", partial(run_ours, engine, prompts, new, False, [])),
    ]


def _ratio(times: dict, a: str, b: str, batch: int) -> float:
    """Median over rounds of (time of b) / (time of a): a's speed relative to b."""
    pairs = zip(times[(a, batch)], times[(b, batch)], strict=True)
    return statistics.median(tb / ta for ta, tb in pairs)


def table(batches: list[int], new: int, best: dict, hf: dict, times: dict) -> str:
    """Best tok/s per variant and the ratios (medians of back-to-back rounds)."""
    lines = [
        "| batch | HF generate tok/s | plain vLLM (min_p) tok/s | ours, sets tok/s "
        "| ours, no ids tok/s | ours sets / plain vLLM | sets / no ids | ours / HF |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in batches:
        tokens = b * new
        tps = {v: tokens / best[(v, b)] for v in VARIANTS}
        gen = tokens / hf[b] if b in hf else float("nan")
        lines.append(
            f"| {b} | {gen:.1f} | {tps['vllm']:.1f} | {tps['ours, sets']:.1f} "
            f"| {tps['ours, no ids']:.1f} | {_ratio(times, 'ours, sets', 'vllm', b):.2f} "
            f"| {_ratio(times, 'ours, sets', 'ours, no ids', b):.2f} "
            f"| {tps['ours, sets'] / gen:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="model spec for resolve_model (default SmolLM2)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip HF generate")
    ap.add_argument(
        "--hf-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads for HF generate (default all cores; on a busy machine OpenMP "
        "threads that wait for each other can make 2 threads 5x slower than 1)",
    )
    ap.add_argument("--quick", action="store_true", help="16 tokens, 1 repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats = 16, 1
    from dvp_server.model_store import resolve_model

    model_dir = resolve_model(args.model)
    load0 = os.getloadavg()
    hf = (
        {}
        if args.no_hf
        else time_hf_generate(
            model_dir, args.batches, args.new_tokens, args.repeats, args.hf_threads
        )
    )
    best, startup, times, sizes = asyncio.run(
        bench_vllm(model_dir, args.batches, args.new_tokens, args.repeats)
    )
    with open("/proc/cpuinfo") as f:
        names = [x.split(":", 1)[1].strip() for x in f if x.startswith("model name")]
    cpu = names[0] if names else platform.processor()
    print(
        f"\n{cpu}, {os.cpu_count()} cores, fp32, {args.new_tokens} new tokens, min_p={MIN_P}, "
        f"best of {args.repeats}; HF threads {args.hf_threads}; vLLM startup {startup:.1f} s; "
        f"load average {load0[0]:.1f} before, {os.getloadavg()[0]:.1f} after\n"
    )
    print(table(args.batches, args.new_tokens, best, hf, times))
    if sizes:
        print(f"\n|S| over {len(sizes)} steps: mean {statistics.mean(sizes):.1f}, max {max(sizes)}")


if __name__ == "__main__":  # vLLM spawns its engine processes
    main()
