"""Weight updates under a steady GRPO-shaped load: tokens/s and stall per update policy.

One server per engine (``--engines torch vllm``, one after the other, never two
at once), ``--weights-root`` holding two checkpoints: ``a`` (the served files,
linked) and ``b`` (a seeded perturbed copy, every float tensor times
``1 + 0.01 * N(0, 1)``). Per arm, ``--clients`` threads send requests back to
back (``dvp_client.Client``), each ``--prompts`` chat prompts x ``--n`` samples x
``--max-tokens`` tokens (eos ignored, seeded, ``min_p`` 1e-3), more rows than
``--max-batch`` so the engine stays full. After ``--warmup`` seconds the window
opens: ``--window`` seconds, with one ``POST /v1/weights`` every ``--interval``
seconds (the first half an interval in; ``a`` and ``b`` alternate) under the
arm's ``on_inflight``; the ``none`` arm sends no update. Then the clients stop
(each ends its request) and the server goes idle before the next arm. Arms
``none drain abort keep recompute``, every round in turn, the order reversed
every other round, so the machine's other jobs hit them alike.

Measured, from the server's ``/metrics`` polled every ``--poll`` seconds:

- generated tokens/s over the window (torch: the tokens of every engine step,
  ``dvp_batch_size_sum``; vLLM: the completion-token counter, fed per 16-step
  chunk; both also count the tokens of rollouts an abort then throws away);
- tokens lost: engine-generated tokens of the whole arm minus the tokens in the
  responses the clients got (abort fails the whole request it hits);
- per update: the response's ``wait_s`` (drain: the gate closed while the batch
  ran out) and ``load_s`` (read + swap), the rollouts drained / aborted / kept,
  and the stall: the longest time with no token arriving between the update's
  send and 1 s after it returned (torch: the engine's step counter
  ``dvp_batch_size_count``; vLLM: the completion-token counter), against the
  same statistic at the same offsets in the ``none`` arm (``idle gap``: what the
  poll and chunking alone give).

    .venv/bin/python bench/async_updates.py                          # tiny, both engines
    .venv/bin/python bench/async_updates.py --model smollm2 --rounds 2 \\
        --json-out /tmp/async.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from _load_probe import scrape  # bench/, next to this file
from _prompts import QUESTIONS
from dvp_client import Client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

ARMS = ["none", "drain", "abort", "keep", "recompute"]
TOKENS = 'dvp_tokens_total{"kind": "completion"}'
STEPS = "dvp_batch_size_count"
STEP_ROWS = "dvp_batch_size_sum"  # rows per decode step summed: tokens, step by step


def _model(spec: str, engine: str, tmp: Path) -> Path:
    """The transformers directory: the tiny random model (built here) or a spec resolved."""
    if spec == "tiny":
        from _models import VLLM_TINY_HEADS, build_tiny_model  # type: ignore[import-not-found]

        heads = VLLM_TINY_HEADS if engine == "vllm" else {}
        return Path(build_tiny_model(tmp / f"model-{engine}", **heads))
    from dvp_server.model_store import resolve_model

    return Path(resolve_model(spec, None))


def _checkpoints(model: Path, root: Path, seed: int = 0) -> None:
    """``root/a``: the served safetensors (linked); ``root/b``: a perturbed copy."""
    import torch
    from safetensors.torch import load_file, save_file

    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    gen = torch.Generator().manual_seed(seed)
    for f in sorted(model.glob("*.safetensors")):
        try:
            os.link(f, root / "a" / f.name)
        except OSError:
            (root / "a" / f.name).write_bytes(f.read_bytes())
        sd = load_file(str(f))
        for k, t in sd.items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
                sd[k] = (t.float() * (1 + 0.01 * noise)).to(t.dtype)
        save_file(sd, str(root / "b" / f.name))


def _server(engine: str, model: Path, root: Path, args: argparse.Namespace, tmp: Path) -> Any:
    from rl_workload import Server  # bench/, next to this file

    env = dict(os.environ)
    if engine == "vllm":
        cores = ",".join(map(str, sorted(os.sched_getaffinity(0))))
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cores)
    rows = args.clients * args.prompts * args.n
    cmd = [
        sys.executable, "-m", "dvp_server", "--engine", engine, "--model", str(model),
        "--max-batch", str(args.max_batch), "--max-queue", str(max(rows, 64)),
        "--max-rollouts", str(args.prompts * args.n),
        "--max-tokens-cap", str(max(args.max_tokens, 64)),
        "--weights-root", str(root), "--log-level", "warning",
    ]  # fmt: skip
    server = Server(f"dvp-{engine}", cmd, env, tmp / f"server-{engine}.log")
    print(f"{engine} server up in {server.start(900.0):.0f} s", flush=True)
    return server


class Poller(threading.Thread):
    """``/metrics`` every ``period`` s: (time, completion tokens, engine steps, tokens
    by step)."""

    def __init__(self, url: str, period: float) -> None:
        super().__init__(daemon=True)
        self.url, self.period = url, period
        self.samples: list[tuple[float, float, float, float]] = []
        self.done = threading.Event()
        self.first = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self.done.is_set():
                try:
                    m = scrape(self.url, None, http)
                except (httpx.HTTPError, ValueError):
                    self.done.wait(self.period)
                    continue
                now = time.perf_counter()
                row = (now, m.get(TOKENS, 0.0), m.get(STEPS, 0.0), m.get(STEP_ROWS, 0.0))
                self.samples.append(row)
                self.first.set()
                self.done.wait(self.period)

    def at(self, t: float, steps: bool) -> float:
        """Generated tokens at the last sample before ``t`` (``steps``: counted per engine
        step; else per chunk sent)."""
        before = [s[3 if steps else 1] for s in self.samples if s[0] <= t]
        return before[-1] if before else 0.0

    def gap(self, t0: float, t1: float, steps: bool) -> float:
        """Longest time between two sample times at which the counter moved, in
        [t0, t1] (the last move before t0 included)."""
        col = 2 if steps else 1
        moves = [b[0] for a, b in itertools.pairwise(self.samples) if b[col] > a[col]]
        inside = [t for t in moves if t0 <= t <= t1]
        earlier = [t for t in moves if t < t0]
        pts = earlier[-1:] + inside
        if not pts:
            return t1 - t0
        pts.append(max(pts[-1], min(t1, self.samples[-1][0])))
        return max((b - a for a, b in itertools.pairwise(pts)), default=0.0)


def run_arm(url: str, arm: str, args: argparse.Namespace, rnd: int, flip: list[int]) -> dict:
    """One arm: load, a window with updates (unless ``none``), then the clients stop."""
    stop = threading.Event()
    delivered, errors = [0], [0]
    lock = threading.Lock()
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS]

    def client(c: int) -> None:
        api = Client(url, max_retries=0, timeout=900)
        i = 0
        while not stop.is_set():
            first = (c * args.prompts + i) % len(prompts)
            batch = [prompts[(first + j) % len(prompts)] for j in range(args.prompts)]
            try:
                out = api.rollouts(
                    batch, n=args.n, max_tokens=args.max_tokens, ignore_eos=True,
                    seed=rnd * 100_000 + c * 1000 + i, pruning={"min_p": 1e-3},
                    return_text=False,
                )  # fmt: skip
                n = sum(len(r.token_ids) for r in out.rollouts)
                with lock:
                    delivered[0] += n
            except Exception:  # an aborted request: its tokens are lost
                with lock:
                    errors[0] += 1
            i += 1

    poller = Poller(url, args.poll)
    poller.start()
    if not poller.first.wait(60):
        raise RuntimeError(f"no /metrics from {url}")
    start_tokens = poller.samples[-1][1]
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(args.warmup)
    w0 = time.perf_counter()
    updates: list[dict[str, Any]] = []
    api = Client(url, max_retries=0, timeout=900)
    for k in range(int(args.window // args.interval)):
        t_at = w0 + (k + 0.5) * args.interval
        time.sleep(max(0.0, t_at - time.perf_counter()))
        if arm == "none":
            updates.append({"t0": time.perf_counter(), "t1": time.perf_counter()})
            continue
        name = "b" if flip[0] % 2 == 0 else "a"
        flip[0] += 1
        t0 = time.perf_counter()
        [r] = api.update_weights(name, on_inflight=arm)  # type: ignore[arg-type]
        updates.append({
            "t0": t0, "t1": time.perf_counter(), "wait_s": r.wait_s, "load_s": r.load_s,
            "drained": r.drained_rollouts, "aborted": r.aborted_rollouts,
            "kept": r.kept_rollouts, "version": r.policy_version,
        })  # fmt: skip
    time.sleep(max(0.0, w0 + args.window - time.perf_counter()))
    w1 = time.perf_counter()
    stop.set()
    for t in threads:
        t.join()
    n = len(poller.samples)
    while len(poller.samples) < n + 3:  # the engine idle again, in the counter
        time.sleep(args.poll)
    poller.done.set()
    poller.join()
    end_tokens = poller.samples[-1][1]
    steps = args.engine == "torch"
    for u in updates:
        u["gap_s"] = poller.gap(u["t0"], u["t1"] + 1.0, steps)
        u["call_s"] = u["t1"] - u["t0"]
        del u["t0"], u["t1"]
    window_tokens = poller.at(w1, steps) - poller.at(w0, steps)
    return {
        "tok_s": window_tokens / (w1 - w0),
        "lost_tokens": end_tokens - start_tokens - delivered[0],
        "failed_requests": errors[0],
        "updates": updates,
        "load": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' (random, built here) or a spec")
    ap.add_argument("--engines", nargs="+", default=["torch", "vllm"])
    ap.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--interval", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--poll", type=float, default=0.05)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on the way out
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()}", flush=True)  # fmt: skip
    results: dict[str, Any] = {"args": vars(args), "engines": {}}
    for engine in args.engines:
        args.engine = engine
        with ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dvp-async-")))
            model = _model(args.model, engine, tmp)
            _checkpoints(model, tmp / "root")
            server = _server(engine, model, tmp / "root", args, tmp)
            stack.callback(server.stop)
            Client(server.url, timeout=600).rollouts(["warm up"], n=2, max_tokens=8)
            per: dict[str, list[dict]] = {a: [] for a in args.arms}
            flip = [0]
            for rnd in range(args.rounds):
                for arm in args.arms if rnd % 2 == 0 else args.arms[::-1]:
                    try:
                        res = run_arm(server.url, arm, args, rnd, flip)
                    except Exception:
                        print(server.log_path.read_text(errors="replace")[-6000:], flush=True)
                        raise
                    per[arm].append(res)
                    ups = res["updates"]
                    print(
                        f"{engine} round {rnd} {arm:>9}: {res['tok_s']:7.1f} tok/s, lost "
                        f"{res['lost_tokens']:.0f} tok, load {res['load']:.1f}; updates "
                        + "; ".join(_fmt_update(u) for u in ups),
                        flush=True,
                    )
            results["engines"][engine] = per
    _report(results, args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))


def _fmt_update(u: dict[str, Any]) -> str:
    if "load_s" not in u:
        return f"gap {u['gap_s']:.2f}"
    return (
        f"wait {u['wait_s']:.2f} load {u['load_s']:.2f} gap {u['gap_s']:.2f} "
        f"d{u['drained']}/a{u['aborted']}/k{u['kept']}"
    )


def _report(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Markdown table per engine: medians, ratio to ``none`` per round, stall per update."""
    med = statistics.median
    print(
        "\n| engine | arm | tok/s per round | vs none (median) | wait_s | load_s | stall (gap) s"
        " | stall - load s | drained / aborted / kept per update | tokens lost per update"
        " | load avg |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---|---:|---|")
    for engine, per in results["engines"].items():
        base = [r["tok_s"] for r in per.get("none", [])]
        for arm, runs in per.items():
            tps = [r["tok_s"] for r in runs]
            ok = base and min(base) > 0
            ratio = f"{med([t / b for t, b in zip(tps, base, strict=False)]):.2f}x" if ok else "-"
            ups = [u for r in runs for u in r["updates"]]
            gaps = [u["gap_s"] for u in ups]
            loads = [r["load"] for r in runs]
            if arm == "none":
                cells = ["-", "-", f"{med(gaps):.2f} (idle gap)", "-", "-", "-"]
            else:
                lost = sum(r["lost_tokens"] for r in runs) / max(1, len(ups))
                cells = [
                    f"{med(u['wait_s'] for u in ups):.2f}",
                    f"{med(u['load_s'] for u in ups):.2f}",
                    f"{med(gaps):.2f} (max {max(gaps):.2f})",
                    f"{med(u['gap_s'] - u['load_s'] for u in ups):+.2f}",
                    " / ".join(f"{med(u[k] for u in ups):.0f}" for k in ("drained", "aborted",
                                                                          "kept")),
                    f"{lost:.0f}",
                ]  # fmt: skip
            print(
                f"| {engine} | {arm} | {', '.join(f'{t:.0f}' for t in tps)} | {ratio} | "
                + " | ".join(cells)
                + f" | {min(loads):.1f}-{max(loads):.1f} |"
            )


if __name__ == "__main__":
    main()
