"""Load on a real server: requests/s and latency percentiles with many async clients.

C clients (one ``dvp_client.AsyncClient`` each) send R requests each, one after
the other, all clients at once. Each request asks for ``--n`` rollouts of one
prompt, ``--max-tokens`` new tokens (eos ignored, so every rollout has exactly
that many), ``min_p`` pruning and the safe-set ids; every response is checked
like ``tests/test_load.py`` does (token in its safe set, lengths). Reported:
requests/s and tokens/s over the wall time of the whole run, p50 / p90 / p99 /
max latency per request (client side, retries included), errors, and the
server's own counters from ``/metrics`` (429s, mean engine batch).

By default it starts its own server (``python -m dvp_server``, torch engine;
``--engine vllm`` for the vLLM engine, started like ``bench/rl_workload.py`` does)
over a tiny random model built in a temporary folder (``--model smollm2`` for
the real one) and stops it at the end; ``--url`` measures a running server.

    .venv/bin/python bench/load.py                          # 256 clients x 20 requests
    .venv/bin/python bench/load.py --clients 64 --requests 10 --max-batch 32
    .venv/bin/python bench/load.py --url http://127.0.0.1:8000 --model-name smollm2
    .venv/bin/python bench/load.py --compare 3 --clients 48 --requests 4 \\
        --max-batch 16 --min-tokens 8 --max-tokens 64   # continuous batching on vs off
    .venv/bin/python bench/load.py --engine vllm --model smollm2 --compare 3 \\
        --clients 32 --requests 3 --min-tokens 8 --max-tokens 64   # vLLM engine

``--compare`` answers: does throughput under concurrent load reach the engine's
best single-batch throughput (one request of ``max_batch`` rollouts of
``--max-tokens``), with and without continuous batching? Requests of varied
lengths (``--min-tokens``) are what a batch that waits for its longest row wastes.
With ``--engine vllm`` (always continuous batching) one server serves every round:
a warm-up request, then per round the single batch and the load, back to back.
Each vLLM round also reports (BENCHMARKS.md "Load", vLLM subsection, says why):

- ``steady_tokens_per_s``: generated tokens/s while every client is busy, from
  the server's completion-token counter polled every 0.25 s, from the first poll
  with the batch full to the last one before the first client has finished its
  requests (after that the batch only drains: a finite run's tail);
- ``processed_load_over_single``: prompt + generated tokens/s, load over single
  batch (every rollout's prompt is prefilled; short requests bring more prompt
  tokens per generated token than the single batch does);
- CPU seconds by server process (API, engine core, worker), of this process (the
  clients) and of everything else on the machine (other jobs: noise).
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
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from _load_probe import PROMPT_KEY, Sampler, busy_cpu_s, scrape, ssl_context  # bench/
from _load_tables import compare_table, vllm_table  # bench/
from dvp_client import AsyncClient

ROOT = Path(__file__).resolve().parent.parent


def _model(args: argparse.Namespace, stack: ExitStack) -> str:
    """The model to serve: a spec, or the tiny random test model built in a temp folder."""
    if args.model != "tiny":
        return str(args.model)
    sys.path.insert(0, str(ROOT / "tests"))
    from _models import VLLM_TINY_HEADS, build_tiny_model  # type: ignore[import-not-found]

    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dvp-load-model-")))
    heads = VLLM_TINY_HEADS if args.engine == "vllm" else {}
    return str(build_tiny_model(tmp / "model", **heads))


def _vllm_server(args: argparse.Namespace, stack: ExitStack, model: str) -> str:
    """``dvp-serve --engine vllm`` in its own process group (``rl_workload.Server``).

    Same environment as ``bench/rl_workload.py`` (vLLM's CPU workers bound to every
    core of this process); the whole group is stopped when ``stack`` closes.
    """
    from rl_workload import Server  # bench/, next to this file

    env = dict(os.environ)
    if env.get("VLLM_CPU_KVCACHE_SPACE") == "":
        del env["VLLM_CPU_KVCACHE_SPACE"]
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0)))))
    cmd = [
        sys.executable, "-m", "dvp_server", "--engine", "vllm", "--model", model,
        "--dtype", args.dtype,
        "--max-batch", str(args.max_batch),
        "--max-queue", str(args.max_queue),
        "--max-rollouts", str(min(512, args.max_batch + args.max_queue)),
        "--log-level", "warning",
    ]  # fmt: skip
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dvp-load-")))
    server = Server("ours-vllm", cmd, env, tmp / "server.log")
    stack.callback(server.stop)
    print(f"vLLM-engine server up in {server.start(900.0):.0f} s", flush=True)
    assert server.proc is not None
    args.server_pgid = server.proc.pid  # its own session: the group id is the leader's pid
    return server.url


def _server(args: argparse.Namespace, stack: ExitStack, model: str | None = None) -> str:
    """Start a server as the tests do (tests/conftest.py) and return its URL."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import start_server, stop_server  # type: ignore[import-not-found]

    model = model or _model(args, stack)
    if args.engine == "vllm":
        return _vllm_server(args, stack, model)
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dvp-load-")))
    cb = "--continuous-batching" if args.continuous_batching else "--no-continuous-batching"
    flags = [
        "--engine", "torch",
        "--max-batch", str(args.max_batch),
        "--max-queue", str(args.max_queue),
        "--threads", str(args.threads),
        "--max-rollouts", str(min(512, args.max_batch + args.max_queue)),
        "--log-level", "warning",
        "--dtype", args.dtype,
        cb,
    ]  # fmt: skip
    server = start_server(model, tmp / "server.log", flags, 900.0)
    stack.callback(stop_server, server)
    return str(server.base_url)


def _max_tokens(args: argparse.Namespace, c: int, i: int) -> int:
    """Request i of client c: ``--max-tokens``, or uniform in [--min-tokens, --max-tokens]."""
    lo = args.min_tokens if args.min_tokens is not None else args.max_tokens
    return lo + (c * 7919 + i * 104_729) % (args.max_tokens - lo + 1)


def _check(batch: Any, max_tokens: int) -> None:
    for r in batch.rollouts:
        assert len(r.token_ids) == max_tokens == len(r.masked_logprobs) == len(r.safe_sizes)
        for t, token in enumerate(r.token_ids):
            ids = r.safe_token_ids.step(t)
            assert token in ids and len(ids) == r.safe_sizes[t]


async def _client(
    url: str,
    c: int,
    args: argparse.Namespace,
    lat: list[float],
    tokens: list[int],
    done_at: list[float],
) -> list[str]:
    errors: list[str] = []
    http = httpx.AsyncClient(verify=ssl_context())  # the dvp client sets its timeout
    async with (
        http,
        AsyncClient(
            url, api_key=args.api_key, max_retries=args.retries, http_client=http
        ) as client,
    ):
        for i in range(args.requests):
            t0 = time.perf_counter()
            max_tokens = _max_tokens(args, c, i)
            try:
                batch = await client.rollouts(
                    [f"Load test prompt {c}.{i}: say something."],
                    n=args.n,
                    max_tokens=max_tokens,
                    ignore_eos=True,
                    seed=c * 100_003 + i,
                    pruning={"min_p": args.min_p},
                    return_safe_token_ids=True,
                    return_text=False,
                )
                _check(batch, max_tokens)
                lat.append(time.perf_counter() - t0)
                tokens.append(args.n * max_tokens)
            except Exception as exc:
                errors.append(f"client {c} request {i}: {type(exc).__name__}: {exc}")
    done_at.append(time.perf_counter())
    return errors


def _pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def single_batch(url: str, args: argparse.Namespace, n: int | None = None) -> float:
    """Tokens/s of one request of ``max_batch`` rollouts x ``--max-tokens``: one full batch.

    ``n`` (default ``--max-batch``) rollouts; a smaller ``n`` serves as a warm-up.
    """
    n = n or args.max_batch

    async def one() -> float:
        http = httpx.AsyncClient(verify=ssl_context())  # as the load's clients
        async with http, AsyncClient(url, api_key=args.api_key, http_client=http) as client:
            t0 = time.perf_counter()
            batch = await client.rollouts(
                ["Single batch prompt: say something."],
                n=n,
                max_tokens=args.max_tokens,
                ignore_eos=True,
                seed=7,
                pruning={"min_p": args.min_p},
                return_safe_token_ids=True,
                return_text=False,
            )
            dt = time.perf_counter() - t0
            _check(batch, args.max_tokens)
            return n * args.max_tokens / dt

    return asyncio.run(one())


def run(args: argparse.Namespace, url: str | None = None) -> dict[str, Any]:
    with ExitStack() as stack:
        url = url or args.url or _server(args, stack)
        before = scrape(url, args.api_key)
        lat: list[float] = []
        tokens: list[int] = []
        done_at: list[float] = []

        async def all_clients() -> list[list[str]]:
            calls = (_client(url, c, args, lat, tokens, done_at) for c in range(args.clients))
            return await asyncio.gather(*calls)

        pgid = getattr(args, "server_pgid", None)
        from rl_workload import group_cpu  # bench/, next to this file

        cpu0, busy0 = (group_cpu(pgid) if pgid else {}), busy_cpu_s()
        with Sampler(url, args.api_key) as sampler:
            t0, ccpu0 = time.perf_counter(), time.process_time()
            errors = [e for errs in asyncio.run(all_clients()) for e in errs]
            wall, client_cpu = time.perf_counter() - t0, time.process_time() - ccpu0
        cpu = {k: v - cpu0[k] for k, v in group_cpu(pgid).items()} if pgid else {}
        other = busy_cpu_s() - busy0 - client_cpu - sum(cpu.values())
        after = scrape(url, args.api_key)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    done = len(lat)
    steps = delta("dvp_batch_size_count")
    full = min(args.clients * args.n, args.max_batch)
    return {
        "clients": args.clients,
        "requests_per_client": args.requests,
        "n": args.n,
        "max_tokens": args.max_tokens,
        "min_tokens": args.min_tokens,
        "max_batch": args.max_batch,
        "threads": args.threads,
        "ok": done,
        "errors": len(errors),
        "first_errors": errors[:3],
        "wall_s": round(wall, 2),
        "client_cpu_s": round(client_cpu, 2),  # this process: clients + response checks
        "server_cpu_s": {k: round(v, 2) for k, v in cpu.items()},  # by role (vLLM engine)
        "other_cpu_s": round(other, 2) if pgid else None,  # other jobs on the machine
        "requests_per_s": round(done / wall, 2),
        "tokens": sum(tokens),
        "tokens_per_s": round(sum(tokens) / wall, 1),
        "prompt_tokens": int(delta(PROMPT_KEY)),  # every rollout's prompt, prefilled
        **sampler.steady(full, min(done_at) if done_at else t0),
        "p50_s": round(statistics.median(lat), 3) if lat else None,
        "p90_s": round(_pct(lat, 0.90), 3) if lat else None,
        "p99_s": round(_pct(lat, 0.99), 3) if lat else None,
        "max_s": round(max(lat), 3) if lat else None,
        "rejected_429": int(delta("dvp_admission_rejected_total")),
        "mean_engine_batch": round(delta("dvp_batch_size_sum") / steps, 2) if steps else None,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }


def compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Continuous batching on vs off, back to back, ``--compare`` rounds.

    Each run starts its own server (same model and flags but the batching mode),
    measures its best single-batch throughput (:func:`single_batch`), then the
    concurrent load; the ratio is load tokens/s over single-batch tokens/s.
    """
    out: list[dict[str, Any]] = []
    with ExitStack() as models:
        model = _model(args, models)
        if args.engine == "vllm":
            return compare_vllm(args, model, models)
        for r in range(args.compare):
            for cb in (True, False):
                args.continuous_batching = cb
                with ExitStack() as stack:
                    url = _server(args, stack, model)
                    single = single_batch(url, args)
                    res = run(args, url)
                res.update(round=r, continuous_batching=cb, single_batch_tps=round(single, 1))
                res["load_over_single"] = round(res["tokens_per_s"] / single, 2)
                print(json.dumps(res), flush=True)
                out.append(res)
    return out


def compare_vllm(args: argparse.Namespace, model: str, stack: ExitStack) -> list[dict[str, Any]]:
    """vLLM engine: one server; a warm-up, then ``--compare`` rounds of single batch + load."""
    url = _server(args, stack, model)
    single_batch(url, args, n=2)  # warm-up: first-request costs stay out of round 0
    out: list[dict[str, Any]] = []
    from rl_workload import group_cpu  # bench/, next to this file

    for r in range(args.compare):
        cpu0, busy0, ccpu0 = group_cpu(args.server_pgid), busy_cpu_s(), time.process_time()
        prompt0 = scrape(url, args.api_key).get(PROMPT_KEY, 0.0)
        single = single_batch(url, args)
        single_tokens = args.max_batch * args.max_tokens
        single_prompt = scrape(url, args.api_key).get(PROMPT_KEY, 0.0) - prompt0
        cpu = {k: round(v - cpu0[k], 2) for k, v in group_cpu(args.server_pgid).items()}
        own = sum(cpu.values()) + time.process_time() - ccpu0
        res_other = round(busy_cpu_s() - busy0 - own, 2)
        res = run(args, url)
        res.update(round=r, engine="vllm", single_batch_tps=round(single, 1))
        res["single_server_cpu_s"] = cpu
        res["single_other_cpu_s"] = res_other
        res["load_over_single"] = round(res["tokens_per_s"] / single, 2)
        # prompt + generated tokens per second: the work the engine did, both phases
        single_all = (single_tokens + single_prompt) * single / single_tokens
        load_all = (res["tokens"] + res["prompt_tokens"]) / res["wall_s"]
        res["single_prompt_tokens"] = int(single_prompt)
        res["processed_load_over_single"] = round(load_all / single_all, 2)
        steady = res["steady_tokens_per_s"]
        res["steady_over_single"] = round(steady / single, 2) if steady else None
        res["load_average"] = round(os.getloadavg()[0], 2)
        print(json.dumps(res), flush=True)
        out.append(res)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", default=None, help="a running server (default: start one)")
    ap.add_argument("--model", default="tiny", help="'tiny' (random, built here) or a model spec")
    ap.add_argument(
        "--engine",
        default="torch",
        choices=("torch", "vllm"),
        help="own server's engine (vllm: --threads / --continuous-batching do not apply)",
    )
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--clients", type=int, default=256)
    ap.add_argument("--requests", type=int, default=20, help="sequential requests per client")
    ap.add_argument("--n", type=int, default=1, help="rollouts per request")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--min-p", type=float, default=0.05)
    ap.add_argument("--max-batch", type=int, default=32, help="server --max-batch (own server)")
    ap.add_argument("--max-queue", type=int, default=1024, help="server --max-queue (own server)")
    ap.add_argument("--threads", type=int, default=1, help="server --threads (own server)")
    ap.add_argument("--retries", type=int, default=5, help="client max_retries (429s, 5xx)")
    ap.add_argument(
        "--min-tokens",
        type=int,
        default=None,
        help="vary max_tokens per request in [min, --max-tokens] (default: all --max-tokens)",
    )
    ap.add_argument("--dtype", default="float32", help="server --dtype (own server)")
    ap.add_argument(
        "--continuous-batching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="own server: torch engine admits rollouts into the running batch",
    )
    ap.add_argument(
        "--compare",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="continuous batching on vs off, back to back, ROUNDS times; each run also "
        "measures the server's single-batch throughput",
    )
    args = ap.parse_args(argv)
    if args.engine == "vllm":  # SIGTERM -> SystemExit: the server's process group is stopped
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.compare:
        results = compare(args)
        print(
            f"{args.clients} clients x {args.requests} requests, n={args.n}, max_tokens "
            f"{args.min_tokens or args.max_tokens}-{args.max_tokens}, --max-batch "
            f"{args.max_batch}, --threads {args.threads}, model {args.model}, load average "
            f"{os.getloadavg()[0]:.1f}, engine {args.engine}"
        )
        print(vllm_table(results) if args.engine == "vllm" else compare_table(results))
        return
    result = run(args)
    print(json.dumps(result, indent=2))
    print(
        f"| {args.clients} x {args.requests} | n={args.n}, {args.max_tokens} tok | "
        f"{result['requests_per_s']} | {result['tokens_per_s']} | {result['p50_s']} | "
        f"{result['p99_s']} | {result['errors']} | {result['rejected_429']} | "
        f"{result['mean_engine_batch']} |"
    )


if __name__ == "__main__":
    main()
