"""Tokens/s of our vLLM engine (DVP metadata on) against plain vLLM and HF ``generate()``.

Same model (SmolLM2-135M-Instruct, fp32, CPU), same prompts (B chat prompts of
different lengths), 64 new tokens with eos ignored, one seeded n=1 request per
rollout, sampling rule ``min_p = 1e-3`` with the effective ``top_k = K``:

- ``vllm``: plain ``AsyncLLM.generate`` on the same engine, ``logprobs=0``,
  ``detokenize=False``, ``FINAL_ONLY`` output (the cheapest plain use);
  ``vllm (min_p only)`` is the same without the top_k cap, for reference;
- ``ours K``: :class:`VllmEngine.generate` with the safe ids returned: K raw
  log-probs per step (flat), sets / masked log-probs / |S| / CSR derived with
  the shared rule (``derive_steps``), chunks every 16 steps;
- ``HF generate``: ``model.generate(do_sample, min_p=1e-3, top_k=20)``, run in the
  same process before the vLLM engine starts (the cores are then free); its
  top_k barely matters to its speed, so it runs once per batch size.

Variants run interleaved ``--repeats`` rounds (load from other processes hits all
alike); the best time is kept, and "ours / plain vLLM" is the median over rounds
of the ratio of the two runs made back to back in that round. "rule share" is the wall time spent in
``read_flat_topk`` + ``derive_steps`` over the ``ours`` run time.

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
                    top_k=20,
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


async def run_plain(llm: Any, prompts: list[list[int]], new: int, top_k: int) -> float:
    """Seconds for plain vLLM to decode the batch (one seeded n=1 request per prompt)."""
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    async def one(i: int) -> int:
        sp = SamplingParams(
            n=1,
            temperature=1.0,
            min_p=MIN_P,
            top_k=top_k,
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


async def run_ours(engine: Any, prompts: list[list[int]], new: int, k: int) -> float:
    """Seconds for our engine to decode the batch with safe ids (DVP metadata on)."""
    from dvp_schemas import PruningRule
    from dvp_server.engines.base import EngineParams

    rule = PruningRule(min_p=MIN_P, top_k=k)

    async def one(i: int) -> int:
        p = EngineParams(
            temperature=1.0,
            max_tokens=new,
            rule=rule,
            seed=i,
            ignore_eos=True,
            return_safe_token_ids=True,
        )
        return sum([len(c.token_ids) async for c in engine.generate(f"ours-{i}", prompts[i], p)])

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


async def bench_vllm(model_dir: Any, batches: list[int], ks: list[int], new: int, reps: int):
    from dvp_server.engines.vllm import engine as vllm_engine
    from dvp_server.engines.vllm.engine import VllmEngine, VllmSettings
    from dvp_server.model_store import load_tokenizer

    rule_s = [0.0]
    vllm_engine.derive_steps = timed(vllm_engine.derive_steps, rule_s)  # type: ignore[assignment]
    vllm_engine.read_flat_topk = timed(vllm_engine.read_flat_topk, rule_s)  # type: ignore[assignment]
    engine = VllmEngine(model_dir, VllmSettings(max_logprobs=max(ks), max_num_seqs=64))
    t0 = time.perf_counter()
    await engine.start()
    startup = time.perf_counter() - t0
    tok = load_tokenizer(model_dir)
    best: dict[tuple[str, int], float] = defaultdict(lambda: 1e9)
    share: dict[tuple[str, int], float] = {}
    times: dict[tuple[str, int], list[float]] = defaultdict(list)
    try:
        for b in batches:
            prompts = chat_prompts(tok, b)
            variants = _variants(engine, prompts, new, ks)
            for _, make in variants:  # warm-up
                await make()
            for _ in range(reps):
                for name, make in variants:
                    rule_s[0] = 0.0
                    dt = await make()
                    print(f"{name} batch {b}: {b * new / dt:.1f} tok/s", flush=True)
                    times[(name, b)].append(dt)
                    if dt < best[(name, b)]:
                        best[(name, b)] = dt
                        share[(name, b)] = rule_s[0] / dt
    finally:
        await engine.shutdown()
    return best, share, startup, times


def _variants(engine: Any, prompts: list[list[int]], new: int, ks: list[int]) -> list:
    """(name, coroutine factory) of every variant for one batch of prompts."""
    out: list[tuple[str, Callable[[], Any]]] = [
        ("vllm (min_p only)", partial(run_plain, engine._llm, prompts, new, 0))
    ]
    for k in ks:
        out.append((f"vllm top_k={k}", partial(run_plain, engine._llm, prompts, new, k)))
        out.append((f"ours K={k}", partial(run_ours, engine, prompts, new, k)))
    return out


def table(
    batches: list[int],
    ks: list[int],
    new: int,
    vllm_best: dict,
    share: dict,
    hf: dict,
    times: dict,
) -> str:
    """Best tok/s per variant; the ratio is the median over rounds of ours / plain, each
    round running the two back to back (robust to load that drifts between rounds)."""
    lines = [
        "| batch | K | HF generate tok/s | plain vLLM tok/s (top_k=K) | ours, sets on tok/s "
        "| ours / plain vLLM (median of rounds) | ours / HF | rule share of ours |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in batches:
        for k in ks:
            tokens = b * new
            plain = tokens / vllm_best[(f"vllm top_k={k}", b)]
            ours = tokens / vllm_best[(f"ours K={k}", b)]
            gen = tokens / hf[b] if b in hf else float("nan")
            pairs = zip(times[(f"vllm top_k={k}", b)], times[(f"ours K={k}", b)], strict=True)
            ratio = statistics.median(tp / to for tp, to in pairs)
            lines.append(
                f"| {b} | {k} | {gen:.1f} | {plain:.1f} | {ours:.1f} | {ratio:.2f} "
                f"| {ours / gen:.2f}x | {100 * share[(f'ours K={k}', b)]:.1f}% |"
            )
    for b in batches:
        nok = b * new / vllm_best[("vllm (min_p only)", b)]
        lines.append(f"\nplain vLLM, min_p only (no top_k), batch {b}: {nok:.1f} tok/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="model spec for resolve_model (default SmolLM2)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--ks", nargs="+", type=int, default=[20, 64, 256])
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
    ap.add_argument("--quick", action="store_true", help="K=20 only, 16 tokens, 1 repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.ks, args.new_tokens, args.repeats = [20], 16, 1
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
    best, share, startup, times = asyncio.run(
        bench_vllm(model_dir, args.batches, args.ks, args.new_tokens, args.repeats)
    )
    with open("/proc/cpuinfo") as f:
        names = [x.split(":", 1)[1].strip() for x in f if x.startswith("model name")]
    cpu = names[0] if names else platform.processor()
    print(
        f"\n{cpu}, {os.cpu_count()} cores, fp32, {args.new_tokens} new tokens, min_p={MIN_P}, "
        f"best of {args.repeats}; HF threads {args.hf_threads}; vLLM startup {startup:.1f} s; "
        f"load average {load0[0]:.1f} before, {os.getloadavg()[0]:.1f} after\n"
    )
    print(table(args.batches, args.ks, args.new_tokens, best, share, hf, times))


if __name__ == "__main__":  # vLLM spawns its engine processes
    main()
