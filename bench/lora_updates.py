"""Weight updates of a LoRA policy: bytes sent and seconds per update, adapter vs full model.

A trainer of a LoRA policy can push its adapter (``adapter_config.json`` +
``adapter_model.safetensors``, written by peft's ``save_pretrained``) or the merged
model (one ``model.safetensors``). Per round this script writes both for a random
rank-``--rank`` adapter on every linear of the model (B non-zero: a trained adapter),
and times ``POST /v1/weights`` for each, as a trainer does it: save under the weights
root, then the request (the server checks the files, then the engine loads them).
Reported per kind: bytes written, save seconds, request seconds (client side) and the
server's ``load_s`` (the swap alone), medians over ``--rounds``; then a greedy decode of
``--decode-tokens`` tokens x ``--decode-n`` rollouts with the adapter served and with
the merged checkpoint served (tokens/s), which is the decode cost of serving an
adapter vs merged weights.

With ``--enable-lora`` (vLLM) the server serves adapters with vLLM's runtime LoRA, and
a second vLLM server without it (the merged checkpoint, no LoRA kernels: what a user
gets who pushes merged weights) is decoded in alternation with it, rounds
interleaved: ``decode_tokens_per_s`` then has ``adapter`` (runtime LoRA, rank
``--rank``), ``merged`` (the merged checkpoint on the LoRA server: the zero adapter's
kernels still run) and ``merged_plain`` (the second server).

It starts its own server (``--engine torch`` or ``vllm``, fp32, the model
``--model``; SmolLM2 by default) with ``--weights-root`` in a temporary folder and
stops it at the end.

    .venv/bin/python bench/lora_updates.py --engine torch --rank 16
    .venv/bin/python bench/lora_updates.py --engine vllm --rank 16
    .venv/bin/python bench/lora_updates.py --engine vllm --rank 16 --enable-lora
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def start(
    model: str, engine: str, root: Path, port: int, log: Path, *extra: str
) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "dvp_server", "--model", model, "--engine", engine, *extra]
    cmd += ["--port", str(port), "--weights-root", str(root), "--max-lora-rank", "64"]
    cmd += ["--log-level", "warning", "--max-batch", "16"]
    if engine == "vllm":
        cmd += ["--kv-cache-bytes", str(1 << 30)]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 3600
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return proc
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise SystemExit("server did not start")
    except BaseException:  # interrupted too: leave no server behind
        proc.kill()
        proc.wait()
        raise


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def push(url: str, name: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/weights", json={"path": name}, timeout=3600)
    wall = time.perf_counter() - t0
    if r.status_code != 200:
        raise SystemExit(f"push {name}: {r.status_code} {r.text}")
    return wall, float(r.json()["load_s"])


def decode_tps(url: str, tokens: int, n: int) -> float:
    body = {
        "prompts": ["The capital of France is"],
        "n": n,
        "sampling": {"max_tokens": tokens, "temperature": 1.0, "ignore_eos": True, "seed": 1},
        "pruning": {"min_p": 1e-3},
    }
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/rollouts", json=body, timeout=3600)
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise SystemExit(f"rollouts: {r.status_code} {r.text}")
    return sum(len(ro["token_ids"]) for ro in r.json()["rollouts"]) / dt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--engine", default="torch", choices=["torch", "vllm"])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--decode-n", type=int, default=8)
    p.add_argument("--port", type=int, default=8931)
    p.add_argument("--enable-lora", action="store_true", help="vLLM's runtime LoRA (above)")
    p.add_argument("--json", type=Path, help="write the results here too")
    args = p.parse_args(argv)
    if args.enable_lora and args.engine != "vllm":
        p.error("--enable-lora is for --engine vllm")

    from dvp_client.integrations._weights import merged_tensors
    from dvp_server.model_store import resolve_model
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model(args.model)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=LINEARS)
    model: Any = get_peft_model(base, cfg)
    names = None
    with tempfile.TemporaryDirectory(prefix="dvp-lora-bench-") as tmp:
        root = Path(tmp)
        extra = ["--enable-lora"] if args.enable_lora else []
        proc = start(str(model_dir), args.engine, root, args.port, root / "server.log", *extra)
        url = f"http://127.0.0.1:{args.port}"
        plain = plain_url = None
        res: dict[str, dict[str, list[float]]] = {"adapter": {}, "full": {}}
        tps: dict[str, list[float]] = {"adapter": [], "merged": []}
        try:
            if args.enable_lora:
                plain = start(str(model_dir), "vllm", root, args.port + 1, root / "plain.log")
                plain_url = f"http://127.0.0.1:{args.port + 1}"
                tps["merged_plain"] = []
            from safetensors import safe_open

            names = []
            for f in sorted(model_dir.glob("*.safetensors")):
                with safe_open(str(f), "pt") as h:
                    names += list(h.keys())
            for k in range(args.rounds):
                g = torch.Generator().manual_seed(k)
                with torch.no_grad():
                    for n, t in model.named_parameters():
                        if "lora_" in n:
                            t.copy_(0.01 * torch.randn(t.shape, generator=g))
                t0 = time.perf_counter()
                model.save_pretrained(str(root / f"a{k}"))
                save_a = time.perf_counter() - t0
                t0 = time.perf_counter()
                (root / f"m{k}").mkdir()
                state = merged_tensors(model)
                save_file({n: state[n] for n in names}, str(root / f"m{k}" / "model.safetensors"))
                save_m = time.perf_counter() - t0
                for kind, folder, save_s in (
                    ("adapter", f"a{k}", save_a),
                    ("full", f"m{k}", save_m),
                ):
                    wall, load = push(url, folder)
                    row = res[kind]
                    row.setdefault("bytes", []).append(folder_bytes(root / folder))
                    row.setdefault("save_s", []).append(save_s)
                    row.setdefault("request_s", []).append(wall)
                    row.setdefault("load_s", []).append(load)
            last = args.rounds - 1
            if plain_url is not None:
                push(plain_url, f"m{last}")
                decode_tps(plain_url, 8, 2)  # warm-up
            for kind, folder in (("adapter", f"a{last}"), ("merged", f"m{last}")):
                push(url, folder)
                decode_tps(url, 8, 2)  # warm-up
                for _ in range(2):  # interleaved with the plain server's merged weights
                    tps[kind].append(decode_tps(url, args.decode_tokens, args.decode_n))
                    if plain_url is not None:
                        tps["merged_plain"].append(
                            decode_tps(plain_url, args.decode_tokens, args.decode_n)
                        )
        finally:
            for server in (proc, plain):
                if server is not None:
                    server.terminate()
                    server.wait(timeout=60)
    out: dict[str, Any] = {"engine": args.engine, "model": args.model, "rank": args.rank}
    for kind, row in res.items():
        out[kind] = {k: statistics.median(v) for k, v in row.items()}
    out["enable_lora"] = args.enable_lora
    out["decode_tokens_per_s"] = {k: statistics.median(v) for k, v in tps.items()}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    raise SystemExit(main())
