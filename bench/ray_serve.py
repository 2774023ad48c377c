"""Ray Serve against direct servers: rollouts/s through Serve's proxy, and a fleet update.

Three arms, run back to back (Serve first, then the direct ones) on the same model
and workload, 2 cores' worth of engine threads in each (``--threads-total``):

- ``direct-1x2``: one ``dvp-serve`` (torch engine, ``--threads 2``), one URL;
- ``direct-2x1``: two ``dvp-serve`` processes (``--threads 1`` each), the client
  spreading requests over both URLs (the scale-out before Ray Serve);
- ``serve-2x1``: Ray Serve (local Ray, ``num_cpus`` 2), 2 replicas x (1 CPU,
  ``threads`` 1), the client against Serve's proxy: the same replicas as
  ``direct-2x1`` plus the proxy's hop (and Ray's controller and proxy processes).

The load: ``--clients`` threads, ``--requests`` each, one after the other; each
request ``--prompts`` prompts x ``--n`` x ``--max-tokens`` (eos ignored, seeded).
Reported per arm: rollouts/s and tokens/s over the whole run, p50 / max latency.

Then, on the Serve arm, fleet weight updates (the served checkpoint again, as the
next ``policy_version``) in the middle of the same load, ``on_inflight`` ``drain``
and ``keep`` in turn (``--update-rounds`` pairs, the order swapped every other
pair): the update's wall time (the client call until every replica serves the new
version), the longest per-replica hold and swap, the rollouts drained and kept,
and the load's rollouts/s with the update in it.

    .venv/bin/python bench/ray_serve.py                       # tiny random model
    .venv/bin/python bench/ray_serve.py --model smollm2 --clients 4 --requests 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from dvp_client import Client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import free_port, start_server, stop_server  # type: ignore[import-not-found]  # noqa: E402

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a prime number is.",
    "List three uses of a paperclip.",
    "What is the capital of France and why?",
]


def _model(args: argparse.Namespace, stack: ExitStack) -> Path:
    """The model's transformers directory (the tiny random one, or a spec resolved)."""
    if args.model == "tiny":
        from _models import build_tiny_model  # type: ignore[import-not-found]

        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dvp-ray-model-")))
        return Path(build_tiny_model(tmp / "model"))
    from dvp_server.model_store import resolve_model

    return Path(resolve_model(args.model, None))


def _server_args(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    return {
        "engine": "torch",
        "threads": threads,
        "max_batch": args.max_batch,
        "log_level": "warning",
    }


def _flags(settings: dict[str, Any]) -> list[str]:
    return [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def load(urls: list[str], args: argparse.Namespace, during: Callable[[], Any] | None = None):
    """Run the load against ``urls``; with ``during``, call it once a third of the way."""
    latencies: list[float] = []
    rollouts = 0
    lock = threading.Lock()
    total = args.clients * args.requests
    started = threading.Event()

    def client(c: int) -> None:
        nonlocal rollouts
        api = Client(urls, max_retries=8, timeout=600)
        for i in range(args.requests):
            t0 = time.perf_counter()
            batch = api.rollouts(
                PROMPTS[: args.prompts],
                n=args.n,
                max_tokens=args.max_tokens,
                ignore_eos=True,
                seed=c * 1000 + i,
            )
            with lock:
                latencies.append(time.perf_counter() - t0)
                rollouts += len(batch.rollouts)
                if len(latencies) >= total // 3:
                    started.set()

    result: dict[str, Any] = {}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients + 1) as pool:
        futures = [pool.submit(client, c) for c in range(args.clients)]
        if during is not None:
            started.wait()
            result["during"] = during()
        for f in futures:
            f.result()
    wall = time.perf_counter() - t0
    result.update(
        wall_s=wall,
        rollouts_per_s=rollouts / wall,
        tokens_per_s=rollouts * args.max_tokens / wall,
        p50_s=statistics.median(latencies),
        max_s=max(latencies),
    )
    return result


def _warm(urls: list[str], args: argparse.Namespace) -> None:
    api = Client(urls, max_retries=8, timeout=600)
    for _ in range(len(urls) * 2):
        api.rollouts(PROMPTS[:1], n=1, max_tokens=4)


def direct(model: Path, args: argparse.Namespace, replicas: int, stack: ExitStack) -> list[str]:
    """``replicas`` dvp-serve processes sharing ``--threads-total``; their URLs."""
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dvp-ray-direct-")))
    threads = args.threads_total // replicas
    urls = []
    for i in range(replicas):
        flags = _flags(_server_args(args, threads))
        server = start_server(str(model), tmp / f"server{i}.log", flags, 900.0)
        stack.callback(stop_server, server)
        urls.append(str(server.base_url))
    return urls


def ray_serve(model: Path, root: Path, args: argparse.Namespace, stack: ExitStack) -> str:
    """A local Ray with Serve's proxy over 2 replicas; its URL once they serve."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    for attempt in (1, 2):  # on a busy machine the raylet can miss Ray's fixed 30 s start
        try:
            ray.init(num_cpus=args.threads_total, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    stack.callback(ray.shutdown)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    stack.callback(serve.shutdown)
    replicas = args.threads_total // 1
    app = {
        "name": "dvp",
        "route_prefix": "/",
        "import_path": "dvp_server.deploy.ray_serve:build_app",
        "args": {**_server_args(args, 1), "model": str(model), "weights_root": str(root)},
        "deployments": [
            {
                "name": "DvpServe",
                "num_replicas": replicas,
                "ray_actor_options": {"num_cpus": 1},
                "user_config": {"weights": None},
            }
        ],
    }
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            fleet = httpx.get(f"{url}/v1/fleet", timeout=30).json()
            if fleet.get("converged") and len(fleet["replicas"]) == replicas:
                return url
        except (httpx.HTTPError, json.JSONDecodeError):
            pass
        time.sleep(1)
    raise RuntimeError("Serve's replicas did not start in time")


def _checkpoint(model: Path, root: Path) -> None:
    """The served checkpoint again under ``root/same`` (hard links where possible)."""
    (root / "same").mkdir()
    for f in model.glob("*.safetensors"):
        try:
            os.link(f, root / "same" / f.name)
        except OSError:
            shutil.copy(f, root / "same" / f.name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny' (random, built here) or a spec")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--threads-total", type=int, default=2)
    p.add_argument("--update-rounds", type=int, default=1, help="fleet updates: drain+keep pairs")
    p.add_argument("--skip-direct", action="store_true", help="only the Serve arm and updates")
    args = p.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    results: dict[str, Any] = {"args": vars(args)}
    with ExitStack() as stack:
        model = _model(args, stack)
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dvp-ray-root-")))
        _checkpoint(model, root)
        ray_stack = stack.enter_context(ExitStack())
        url = ray_serve(model, root, args, ray_stack)
        _warm([url], args)
        results["serve-2x1"] = load([url], args)
        print("serve-2x1", json.dumps(results["serve-2x1"]), flush=True)

        version = [0]

        def update(policy: str) -> dict[str, Any]:
            version[0] += 1
            t0 = time.perf_counter()
            [r] = Client(url, timeout=900).update_weights(
                "same",
                policy_version=version[0],
                on_inflight=policy,  # type: ignore[arg-type]
            )
            return {
                "update_s": time.perf_counter() - t0,
                "replica_hold_s": r.wait_s,
                "replica_swap_s": r.load_s,
                "drained_rollouts": r.drained_rollouts,
                "kept_rollouts": r.kept_rollouts,
                "versions": sorted({x.policy_version for x in r.replicas or []}),
            }

        for i in range(args.update_rounds):
            for policy in ("drain", "keep") if i % 2 == 0 else ("keep", "drain"):
                name = f"serve-2x1+{policy}"
                res = load([url], args, during=lambda p=policy: update(p))  # type: ignore[misc]
                results.setdefault(name, []).append(res)
                print(name, json.dumps(res), flush=True)
        ray_stack.close()  # Ray down before the direct arms
        for name, replicas in () if args.skip_direct else (("direct-2x1", 2), ("direct-1x2", 1)):
            with ExitStack() as arm:
                urls = direct(model, args, replicas, arm)
                _warm(urls, args)
                results[name] = load(urls, args)
                print(name, json.dumps(results[name]), flush=True)
    ref = "serve-2x1" if args.skip_direct else "direct-1x2"
    base = results[ref]["rollouts_per_s"]
    for name in ("direct-2x1", "serve-2x1"):
        if name in results:
            print(f"{name}: {results[name]['rollouts_per_s'] / base:.2f}x {ref} rollouts/s")
    for policy in ("drain", "keep"):
        for res in results[f"serve-2x1+{policy}"]:
            u = res["during"]
            print(
                f"serve-2x1+{policy}: {res['rollouts_per_s'] / base:.2f}x {ref} rollouts/s; "
                f"fleet update {u['update_s']:.2f} s (replica hold {u['replica_hold_s']:.2f} s, "
                f"swap {u['replica_swap_s']:.2f} s), {u['drained_rollouts']} drained, "
                f"{u['kept_rollouts']} kept, versions {u['versions']}"
            )
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
