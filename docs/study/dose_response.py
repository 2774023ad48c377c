"""Dose-response replay without training (issue 27, item 4; plan section 8).

One fixed set of rollouts (the study's chat task, sampled once by the FP8 engine from
the initial weights, T = 1, no pruning) is scored, for each checkpoint (initial and a
GRPO-trained one), by the FP8 engine (``POST /v1/score`` under rho) and by the fp32
trainer (teacher-forced, the engine's safe sets replayed). Per token
``d = log pi_S(y) (trainer) - log pi_S(y) (engine)``; tokens outside S at that rho are
left out (DVP would never sample them) and counted. Per (checkpoint, rho): K3 =
mean(exp(d) - 1 - d) and the share of tokens with |d| > 1. Intervals: percentile
bootstrap over rollouts (the same resample for every cell, so every difference is
paired), for the change against rho = 0 within a checkpoint and for the difference of
those changes between the checkpoints.

    python docs/study/dose_response.py --url http://127.0.0.1:8871 \\
        --weights-root /tmp/w --trained /tmp/w/ckpt/step-00012 --out docs/study/dose
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dvp_client import Client  # noqa: E402
from dvp_client.safe_ids import as_list_form  # noqa: E402
from grpo import WeightPusher, completion_logits, load_policy  # noqa: E402
from run import TRAIN, messages  # noqa: E402

RHOS = (0.0, 1e-3, 1e-2, 5e-2)


def trainer_logprobs(model: Any, batch: Any, chunk: int = 8) -> list[torch.Tensor]:
    """fp32 teacher-forced log-softmax rows per rollout, ``[T_i, V]`` each (T = 1)."""
    out: list[torch.Tensor] = []
    idx = list(range(len(batch.rollouts)))
    for i in range(0, len(idx), chunk):
        sub = batch.model_copy(update={"rollouts": batch.rollouts[i : i + chunk]})
        bt = sub.to_torch(pad_id=0)
        with torch.no_grad():
            lp = torch.log_softmax(completion_logits(model, bt).float(), dim=-1)
        for j, r in enumerate(sub.rollouts):
            out.append(lp[j, : len(r.token_ids)].clone())
    return out


def per_rollout(
    client: Client, batch: Any, lps: list[torch.Tensor], rho: float
) -> list[dict[str, Any]]:
    """Per rollout: sums of K3 terms, |d| > 1 counts, counted and excluded tokens."""
    seqs = [(r.prompt_token_ids, r.token_ids) for r in batch.rollouts]
    resp = client.score(seqs, temperature=1.0, pruning={"min_p": rho}, return_safe_token_ids=True)
    rows = []
    for r, res, lp in zip(batch.rollouts, resp.results, lps, strict=True):
        sets = as_list_form(res.safe_token_ids, res.safe_sizes)
        k3, big, n, out_s, dsum = 0.0, 0, 0, 0, []
        for t, y in enumerate(r.token_ids):
            if not res.in_safe_set[t]:
                out_s += 1
                continue
            s_ids = sets.ids[sets.offsets[t] : sets.offsets[t + 1]]
            row = lp[t]
            tr = float(row[y] - torch.logsumexp(row[s_ids], 0)) if s_ids else float(row[y])
            d = tr - float(res.masked_logprobs[t])
            k3 += float(np.expm1(d) - d)
            big += abs(d) > 1
            n += 1
            dsum.append(d)
        rows.append({"k3_sum": k3, "big": big, "n": n, "excluded": out_s})
    return rows


def stats(cells: dict[tuple[str, float], list[dict[str, Any]]], idx: np.ndarray) -> dict:
    out = {}
    for key, rows in cells.items():
        k3 = sum(rows[i]["k3_sum"] for i in idx)
        big = sum(rows[i]["big"] for i in idx)
        n = sum(rows[i]["n"] for i in idx)
        out[key] = (k3 / max(n, 1), big / max(n, 1))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True, help="an FP8 dvp-serve (torch --quantize fp8)")
    p.add_argument("--weights-root", type=Path, required=True)
    p.add_argument("--trained", type=Path, required=True, help="folder with model.safetensors")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import load_file

    init, model_dir = load_policy("smollm2", 0, a.seed)
    init.eval()
    trained, _ = load_policy("smollm2", 0, a.seed)
    state = load_file(str(a.trained / "model.safetensors"))
    missing = trained.load_state_dict(state, strict=False)
    print("trained checkpoint: missing", len(missing.missing_keys), flush=True)
    trained.eval()
    rng = random.Random(a.seed)
    probs = [rng.choice(TRAIN) for _ in range(a.prompts)]
    cells: dict[tuple[str, float], list[dict[str, Any]]] = {}
    with Client(a.url, timeout=7200) as client:
        pusher = WeightPusher(client, model_dir, a.weights_root / "dose-response")
        pusher.push(init, 0)
        batch = client.rollouts(
            [messages(x, y) for x, y in probs], n=a.n, temperature=1.0,
            max_tokens=a.max_tokens, seed=a.seed, pruning={"min_p": 0.0},
        )  # fmt: skip
        print(
            f"{len(batch.rollouts)} rollouts, "
            f"{sum(len(r.token_ids) for r in batch.rollouts)} tokens",
            flush=True,
        )
        for name, model in (("initial", init), ("trained", trained)):
            if name == "trained":
                pusher.push(model, 1)
            lps = trainer_logprobs(model, batch)
            for rho in RHOS:
                cells[(name, rho)] = per_rollout(client, batch, lps, rho)
                st = stats({(name, rho): cells[(name, rho)]}, np.arange(len(batch.rollouts)))
                print(name, rho, st, flush=True)
    n_roll = len(batch.rollouts)
    point = stats(cells, np.arange(n_roll))
    gen = np.random.default_rng(a.seed)
    boots = [stats(cells, gen.integers(0, n_roll, n_roll)) for _ in range(a.boot)]

    def ci(f: Any) -> list[float]:
        v = np.array([f(b) for b in boots])
        return [float(f(point)), float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]

    report: dict[str, Any] = {"rollouts": n_roll, "cells": {}, "changes": {}}
    for (name, rho), rows in cells.items():
        report["cells"][f"{name} rho={rho:g}"] = {
            "k3": point[(name, rho)][0],
            "share_abs_d_gt1": point[(name, rho)][1],
            "tokens": sum(r["n"] for r in rows),
            "excluded_outside_S": sum(r["excluded"] for r in rows),
        }
    for rho in RHOS[1:]:
        for name in ("initial", "trained"):
            key = f"{name} rho={rho:g} vs 0"
            report["changes"][key] = {
                "dk3": ci(lambda s, n=name, r=rho: s[(n, r)][0] - s[(n, 0.0)][0]),
                "dk3_rel": ci(lambda s, n=name, r=rho: s[(n, r)][0] / s[(n, 0.0)][0] - 1),
                "dshare": ci(lambda s, n=name, r=rho: s[(n, r)][1] - s[(n, 0.0)][1]),
            }
        report["changes"][f"trained minus initial, rho={rho:g} vs 0"] = {
            "dk3_rel": ci(
                lambda s, r=rho: (
                    (s[("trained", r)][0] / s[("trained", 0.0)][0])
                    - (s[("initial", r)][0] / s[("initial", 0.0)][0])
                )
            ),
            "dshare": ci(
                lambda s, r=rho: (
                    (s[("trained", r)][1] - s[("trained", 0.0)][1])
                    - (s[("initial", r)][1] - s[("initial", 0.0)][1])
                )
            ),
        }
    report["changes"]["k3 rho=0 trained / initial"] = ci(
        lambda s: s[("trained", 0.0)][0] / s[("initial", 0.0)][0]
    )
    (a.out / "dose_response.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
