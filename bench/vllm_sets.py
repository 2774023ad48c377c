"""Safe sets the vLLM engine serves vs the torch engine, same prompts, rule and seeds.

Not a timing benchmark: the size of S and the pruned mass ``1 - Z_S`` per step
that each engine returns for the same request (chat prompts x n, T, ``min_p``
alone), with the sampled token checked against its returned set. The two
engines draw with different samplers, so tokens differ after the first steps;
the distributions of |S| and ``1 - Z_S`` are what must agree (same rule, same
model). Before the vLLM engine took S from its own sampler, it capped every set
at K = 20 (issue: mean |S| 16.5 vs 144.6, 69 % of steps cut at min_p = 1e-3).

    .venv/bin/python bench/vllm_sets.py                       # SmolLM2, 8 x 4 x 64, T=1
    .venv/bin/python bench/vllm_sets.py --min-p 1e-4 --temperature 0.7
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
from typing import Any

import numpy as np
from _prompts import QUESTIONS  # bench/, next to this file


def chat_prompts(tokenizer: Any, count: int) -> list[list[int]]:
    out = []
    for i in range(count):
        msgs = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        out.append(list(tokenizer.encode(text, add_special_tokens=False)))
    return out


async def collect(engine: Any, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    """Every step's |S|, log Z_S and whether the token is in its set, over all rollouts."""
    from dvp_schemas import PruningRule
    from dvp_server.engines.base import EngineParams

    async def one(i: int, j: int) -> list[Any]:
        p = EngineParams(
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            rule=PruningRule(min_p=args.min_p),
            seed=1000 * i + j,
            return_safe_token_ids=True,
        )
        return [c async for c in engine.generate(f"s-{i}-{j}", prompts[i], p)]

    jobs = [one(i, j) for i in range(len(prompts)) for j in range(args.n)]
    sizes: list[int] = []
    mass: list[float] = []
    inside = steps = 0
    for chunks in await asyncio.gather(*jobs):
        for c in chunks:
            sizes.extend(c.safe_sizes.tolist())
            mass.extend((1.0 - np.exp(c.safe_logmass.astype(np.float64))).tolist())
            for s, y in enumerate(c.token_ids.tolist()):
                steps += 1
                inside += y in c.safe_ids[c.safe_offsets[s] : c.safe_offsets[s + 1]]
    return {"sizes": sizes, "mass": mass, "inside": inside, "steps": steps}


def row(name: str, r: dict) -> str:
    s, m = np.array(r["sizes"]), np.array(r["mass"])
    return (
        f"| {name} | {r['steps']} | {s.mean():.1f} | {int(np.median(s))} | {s.max()} "
        f"| {100 * (s > 20).mean():.0f} % | {m.mean():.3f} / {np.quantile(m, 0.9):.3f} / "
        f"{m.max():.2f} | {r['inside']}/{r['steps']} |"
    )


async def main_async(args: argparse.Namespace) -> None:
    from dvp_server.engines.torch.engine import TorchEngine
    from dvp_server.engines.vllm.engine import VllmEngine, VllmSettings
    from dvp_server.model_store import load_tokenizer, resolve_model

    model_dir = resolve_model(args.model)
    prompts = chat_prompts(load_tokenizer(model_dir), args.prompts)
    results = {}
    vllm = VllmEngine(model_dir, VllmSettings(max_num_seqs=64))
    await vllm.start()
    try:
        results["vllm"] = await collect(vllm, prompts, args)
    finally:
        await vllm.shutdown()
    print(row("vllm", results["vllm"]), flush=True)  # at once: a slow machine may stop us
    torch_engine = TorchEngine(model_dir, max_batch=32)
    await torch_engine.start()
    try:
        results["torch"] = await collect(torch_engine, prompts, args)
    finally:
        await torch_engine.shutdown()
    print(
        f"\n{args.model or 'SmolLM2'}: {args.prompts} chat prompts x n={args.n} x "
        f"{args.max_tokens} tokens, T={args.temperature}, min_p={args.min_p} (no top_k); "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| engine | steps | mean \\|S\\| | median | max | steps with \\|S\\| > 20 "
        "| pruned mass 1 - Z_S: mean / p90 / max | token in S |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for name in ("torch", "vllm"):
        print(row(name, results[name]))
    ratio = statistics.mean(results["vllm"]["sizes"]) / statistics.mean(results["torch"]["sizes"])
    print(f"\nmean |S| vllm / torch: {ratio:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="model spec (default SmolLM2)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--min-p", type=float, default=1e-3)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":  # vLLM spawns its engine processes
    main()
