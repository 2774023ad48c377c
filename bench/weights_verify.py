"""What ``verify`` costs: seconds per ``POST /v1/weights`` with ``verify`` false vs true.

For each engine (``--engines``, default torch and vllm; fp32, one server at a time) it
starts ``python -m dvp_server --weights-root <tmp>`` over ``--model`` (SmolLM2 by
default), writes two checkpoints under the root (the served model's tensors and a
copy with 0.1 % noise on every tensor, so each update changes the weights), pushes
once each way as a warm-up, then ``--reps`` rounds of one unchecked and one checked
update, interleaved (alternating which goes first) and alternating the two files.
Timed: the whole request, client side. Reported per engine: the median with and
without verify, their ratio and difference (the absolute extra seconds), the median
of the server's own ``load_s`` and of ``verify.seconds`` (the reference forward in a
separate process plus the engine's score), and the largest ``max_abs_diff`` seen.

    .venv/bin/python bench/weights_verify.py                     # SmolLM2, both engines
    .venv/bin/python bench/weights_verify.py --engines torch --reps 3 --out runs/wv.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from rl_workload import Server  # bench/, next to this file
from safetensors.torch import load_file, save_file


def checkpoints(model_dir: Path, root: Path) -> list[str]:
    """The served model's tensors and a noisy copy, under ``root``; their names."""
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    g = torch.Generator().manual_seed(0)
    noisy = {
        k: (v.float() + 1e-3 * v.float().std() * torch.randn(v.shape, generator=g)).to(v.dtype)
        for k, v in sd.items()
    }
    for name, tensors in (("orig", sd), ("noisy", noisy)):
        (root / name).mkdir()
        save_file(tensors, str(root / name / "model.safetensors"))
    return ["orig", "noisy"]


def push(url: str, path: str, verify: bool) -> dict[str, Any]:
    """One update; the client-side seconds and the server's answer."""
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/weights", json={"path": path, "verify": verify}, timeout=1800)
    wall = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"POST /v1/weights {path} verify={verify}: {r.status_code} {r.text}")
    body = r.json()
    rep = body.get("verify")
    if verify != (rep is not None):
        raise RuntimeError(f"verify={verify} but the report is {rep!r}")
    return {
        "verify": verify,
        "path": path,
        "wall_s": wall,
        "load_s": body["load_s"],
        "verify_s": rep["seconds"] if rep else None,
        "max_abs_diff": rep["max_abs_diff"] if rep else None,
        "atol": rep["atol"] if rep else None,
        "policy_version": body["policy_version"],
    }


def bench_engine(engine: str, model: str, model_dir: Path, reps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dvp-wv-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        names = checkpoints(model_dir, root)
        env = dict(os.environ)
        if engine == "vllm":
            env.setdefault(
                "VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0))))
            )
        cmd = [sys.executable, "-m", "dvp_server", "--engine", engine, "--model", model]
        cmd += ["--dtype", "float32", "--weights-root", str(root), "--log-level", "warning"]
        server = Server(f"{engine}-engine", cmd, env, Path(tmp) / "server.log")
        try:
            up = server.start(900.0)
            print(f"{engine}: server up in {up:.0f} s", flush=True)
            runs = []
            k = 0
            for warm in (False, True):  # the first of each kind: not counted
                push(server.url, names[k % 2], warm)
                k += 1
            for i in range(reps):
                for verify in (i % 2 == 0, i % 2 != 0):
                    run = push(server.url, names[k % 2], verify)
                    k += 1
                    run["rep"] = i
                    runs.append(run)
                    print(
                        f"{engine}: rep {i} verify={verify} {run['wall_s']:.2f} s "
                        f"(load {run['load_s']:.2f} s, verify {run['verify_s']})",
                        flush=True,
                    )
        finally:
            server.stop()
    off = [r["wall_s"] for r in runs if not r["verify"]]
    on = [r["wall_s"] for r in runs if r["verify"]]
    return {
        "engine": engine,
        "runs": runs,
        "median_s": {"verify_false": statistics.median(off), "verify_true": statistics.median(on)},
        "ratio": statistics.median(on) / statistics.median(off),
        "extra_s": statistics.median(on) - statistics.median(off),
        "median_load_s": statistics.median(r["load_s"] for r in runs),
        "median_verify_report_s": statistics.median(r["verify_s"] for r in runs if r["verify"]),
        "max_abs_diff": max(r["max_abs_diff"] for r in runs if r["verify"]),
        "atol": runs[-1]["atol"] if runs[-1]["verify"] else runs[-2]["atol"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--engines", default="torch,vllm")
    p.add_argument("--reps", type=int, default=4, help="rounds of one update each way")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    from dvp_server.model_store import resolve_model

    model_dir = resolve_model(args.model)
    load0 = os.getloadavg()
    results = [
        bench_engine(e.strip(), args.model, model_dir, args.reps) for e in args.engines.split(",")
    ]
    out = {
        "model": args.model,
        "reps": args.reps,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "loadavg_start": load0,
            "loadavg_end": os.getloadavg(),
        },
        "results": results,
    }
    for r in results:
        m = r["median_s"]
        print(
            f"{r['engine']}: median {m['verify_false']:.2f} s unchecked, "
            f"{m['verify_true']:.2f} s checked: {r['ratio']:.2f}x, +{r['extra_s']:.2f} s "
            f"(check itself {r['median_verify_report_s']:.2f} s; "
            f"max |d log p| {r['max_abs_diff']:.1e} <= atol {r['atol']:.0e})"
        )
    print(f"load average {load0[0]:.1f} -> {out['machine']['loadavg_end'][0]:.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
