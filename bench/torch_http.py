"""The torch engine through HTTP, at several ``--threads`` settings, against ``generate()``.

What a user gets after ``dvp-serve --engine torch``: C concurrent ``/v1/rollouts``
requests (one chat prompt each from ``_prompts.QUESTIONS``, n = 1, ``--max-tokens``
new tokens with eos ignored, ``min_p = 1e-3``, safe ids returned, seeded), sent at
once by ``dvp_client.AsyncClient`` from this process, against one server per
variant. A variant is ``default`` (no ``--threads`` flag: the server's default) or
a thread count, optionally with ``:passive`` (``OMP_WAIT_POLICY=PASSIVE`` in the
server's environment: OpenMP threads sleep at once instead of spinning after a
parallel region). All servers are up for the whole run and idle while another is
measured; each round measures every variant once, the order reversed every other
round (ABBA), so load from other jobs hits all alike.

Baseline (``--generate``): ``model.generate()`` in this process on the same 16
prompts as one left-padded batch (``do_sample``, T = 1, ``top_k=0``, eos ignored,
stock transformers modules), at 1 thread and at all cores, once per round while
the servers are idle. Reported per variant: tokens/s per round and the median,
the ratio to each baseline, the server's CPU seconds per run, and the 1-minute
load average before each run (``os.getloadavg``: the machine's other jobs).

    .venv/bin/python bench/torch_http.py --variants default 1 --rounds 4 --generate
    .venv/bin/python bench/torch_http.py --variants 2 2:passive 1 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from _prompts import QUESTIONS  # bench/, next to this file
from dvp_client import AsyncClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import ServerProcess, start_server, stop_server  # type: ignore[import-not-found]  # noqa: E402


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its reaped children (``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _flags(variant: str) -> tuple[list[str], dict[str, str]]:
    """Server flags and extra environment of a variant (``default``, ``N``, ``N:passive``)."""
    threads, _, mode = variant.partition(":")
    flags = [] if threads == "default" else ["--threads", str(int(threads))]
    env = {"OMP_WAIT_POLICY": "PASSIVE"} if mode == "passive" else {}
    return flags, env


def _start(variant: str, model: str, tmp: Path, max_batch: int) -> ServerProcess:
    flags, env = _flags(variant)
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        args = [
            "--engine", "torch", "--max-batch", str(max_batch),
            "--log-level", "warning", *flags,
        ]  # fmt: skip
        return start_server(model, tmp / f"server-{variant}.log", args, 600.0)
    finally:
        os.environ.clear()
        os.environ.update(saved)


async def _burst(url: str, clients: int, max_tokens: int, seed: int) -> float:
    """Seconds for ``clients`` concurrent one-prompt requests; every rollout checked."""
    async with AsyncClient(url, timeout=600.0) as c:

        async def one(i: int) -> None:
            prompt = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
            batch = await c.rollouts(
                [prompt], max_tokens=max_tokens, ignore_eos=True, seed=seed + i,
                pruning={"min_p": 1e-3}, return_safe_token_ids=True, return_text=False,
            )  # fmt: skip
            assert len(batch.rollouts[0].token_ids) == max_tokens

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(clients)))
        return time.perf_counter() - t0


class Generate:
    """``model.generate()`` on the same prompts, in this process (the baseline)."""

    def __init__(self, model: str, clients: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        tok: Any = AutoTokenizer.from_pretrained(model)
        rows = [
            list(tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % 16]}],
                                         add_generation_prompt=True)["input_ids"])
            for i in range(clients)
        ]  # fmt: skip
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        k = max(map(len, rows))
        self.ids = torch.full((clients, k), pad, dtype=torch.int64)
        self.mask = torch.zeros_like(self.ids)
        for i, r in enumerate(rows):
            self.ids[i, k - len(r) :] = torch.tensor(r)
            self.mask[i, k - len(r) :] = 1
        self.pad = pad

    def seconds(self, threads: int, new: int) -> float:
        self.torch.set_num_threads(threads)
        t0 = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.generate(
                input_ids=self.ids, attention_mask=self.mask, do_sample=True, temperature=1.0,
                top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=self.pad,
            )  # fmt: skip
        assert out.shape[1] == self.ids.shape[1] + new
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="model spec (default SmolLM2)")
    ap.add_argument("--variants", nargs="+", default=["default", "1"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clients", type=int, default=16, help="concurrent requests")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32, help="server --max-batch (its default)")
    ap.add_argument("--generate", action="store_true", help="also time generate() (baseline)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out

    from dvp_server.model_store import resolve_model

    model = str(resolve_model(args.model))
    cores = os.cpu_count() or 1
    print(f"{platform.processor() or platform.machine()}, {cores} cores, model {model}")
    results: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    base: dict[str, list[float]] = {"generate@1": [], f"generate@{cores}": []}
    n_tok = args.clients * args.max_tokens
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dvp-torch-http-")))
        servers = {}
        for v in args.variants:
            servers[v] = _start(v, model, tmp, args.max_batch)
            stack.callback(stop_server, servers[v])
            asyncio.run(_burst(servers[v].base_url, args.clients, 8, 10_000))  # warm-up
        gen = Generate(model, args.clients) if args.generate else None
        if gen is not None:
            gen.seconds(1, 8)  # warm-up
        for r in range(args.rounds):
            order = args.variants if r % 2 == 0 else args.variants[::-1]
            for v in order:
                load = os.getloadavg()[0]
                cpu0 = _cpu_s(servers[v].proc.pid)
                dt = asyncio.run(_burst(servers[v].base_url, args.clients, args.max_tokens, r))
                cpu = _cpu_s(servers[v].proc.pid) - cpu0
                results[v].append({"tok_s": n_tok / dt, "cpu_s": cpu, "load": load})
                print(f"round {r} {v:>12}: {n_tok / dt:7.1f} tok/s  server CPU {cpu:5.1f} s"
                      f"  load {load:.2f}", flush=True)  # fmt: skip
            if gen is not None:
                for t in (1, cores):
                    tps = n_tok / gen.seconds(t, args.max_tokens)
                    base[f"generate@{t}"].append(tps)
                    print(f"round {r} generate@{t}: {tps:7.1f} tok/s", flush=True)
    _report(args, results, base)


def _report(
    args: argparse.Namespace,
    results: dict[str, list[dict[str, float]]],
    base: dict[str, list[float]],
) -> None:
    """Print the markdown table (medians, per-round ratios) and write the JSON."""
    cols = ["server", "tok/s per round", "median tok/s", "vs generate() per round (median)"]
    print("\n| " + " | ".join([*cols, "server CPU s / run", "load average"]) + " |")
    print("|---|---|---:|---|---:|---|")
    fmt = ", ".join
    for v, runs in results.items():
        tps = [x["tok_s"] for x in runs]
        ratios = []
        for name, b in base.items():
            if b:
                per = [t / g for t, g in zip(tps, b, strict=False)]
                ratios.append(
                    f"{name}: {fmt(f'{x:.2f}' for x in per)} ({statistics.median(per):.2f}x)"
                )
        loads = [x["load"] for x in runs]
        print(
            f"| {v} | {fmt(f'{x:.0f}' for x in tps)} | {statistics.median(tps):.0f} | "
            f"{'; '.join(ratios) or '-'} | {statistics.median(x['cpu_s'] for x in runs):.1f} | "
            f"{min(loads):.1f}-{max(loads):.1f} |"
        )
    for name, b in base.items():
        if b:
            med = statistics.median(b)
            print(f"| {name} | {fmt(f'{x:.0f}' for x in b)} | {med:.0f} | - | - | - |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"servers": results, "generate": base}, indent=1))


if __name__ == "__main__":
    main()
