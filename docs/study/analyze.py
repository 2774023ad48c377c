"""The pre-registered analysis of the issue-27 study (``docs/study/plan.md`` section 6).

Reads ``docs/study/results/<arm>/s<seed>/done.json`` (and ``steps.csv``), keeps the
seeds for which every arm of a comparison finished (paired), and prints per comparison:
n seeds, mean paired difference with a 95 % percentile bootstrap interval (10 000
resamples of seeds, generator seed 0), the exact two-sided Wilcoxon signed-rank p
(zeros dropped), Holm-adjusted p for the secondary family, and the verdict by the
plan's rule (effect: significant and |mean| >= 0.05; no effect: interval inside
[-0.05, 0.05]; otherwise inconclusive).

    python docs/study/analyze.py [--results docs/study/results] [--metric auc_greedy]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

MARGIN = 0.05
MANIPULATION = ("fp8-stale1-none", "fp32-sync-none")
PRIMARY = ("fp8-stale1-dvp1e-2", "fp8-stale1-none")
SECONDARY = [
    ("fp8-stale1-dvp1e-3", "fp8-stale1-none"),
    ("fp8-stale1-dvp1e-2-tis", "fp8-stale1-tis"),
    ("fp8-stale1-tis", "fp8-stale1-none"),
    ("fp8-stale1-icepop", "fp8-stale1-none"),
    ("fp8-stale1-dvp1e-2", "fp8-stale1-tis"),
    ("fp8-sync-none", "fp32-sync-none"),
]


def load(results: Path) -> dict[str, dict[int, dict]]:
    runs: dict[str, dict[int, dict]] = {}
    for f in results.glob("*/s*/done.json"):
        d = json.loads(f.read_text())
        runs.setdefault(d["arm"], {})[int(d["seed"])] = d
    return runs


def compare(runs: dict, a: str, b: str, metric: str) -> dict:
    seeds = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
    diff = np.array([runs[a][s][metric] - runs[b][s][metric] for s in seeds], dtype=float)
    out: dict = {"a": a, "b": b, "n": len(seeds), "seeds": seeds}
    if len(seeds) < 2:
        return out
    gen = np.random.default_rng(0)
    boot = diff[gen.integers(0, len(diff), (10_000, len(diff)))].mean(1)
    nz = diff[diff != 0]
    p = float(wilcoxon(nz, method="exact").pvalue) if len(nz) >= 1 else 1.0
    out.update(
        mean=float(diff.mean()),
        ci=[float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        p=p,
        collapses=[
            sum(runs[a][s]["collapsed"] for s in seeds),
            sum(runs[b][s]["collapsed"] for s in seeds),
        ],
    )
    return out


def verdict(c: dict, p: float, alpha: float = 0.05) -> str:
    if "mean" not in c:
        return "not enough paired seeds"
    if p < alpha and abs(c["mean"]) >= MARGIN:
        return "effect"
    if c["ci"][0] > -MARGIN and c["ci"][1] < MARGIN:
        return "no effect (interval inside the margin)"
    return f"inconclusive at n = {c['n']}"


def holm(ps: list[float]) -> list[float]:
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    adj = [math.nan] * len(ps)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adj[i] = running
    return adj


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--metric", default="auc_greedy")
    a = p.parse_args(argv)
    runs = load(a.results)
    print("finished runs per arm:", {k: sorted(v) for k, v in sorted(runs.items())})
    rows = [("manipulation", compare(runs, *MANIPULATION, a.metric))]
    rows.append(("primary", compare(runs, *PRIMARY, a.metric)))
    sec = [compare(runs, x, y, a.metric) for x, y in SECONDARY]
    adj = holm([c.get("p", 1.0) for c in sec])
    for c, q in zip(sec, adj, strict=True):
        c["p_holm"] = q
        rows.append(("secondary", c))
    for kind, c in rows:
        pv = c.get("p_holm", c.get("p", math.nan))
        head = f"{kind:>12} {c['a']} - {c['b']}: n {c['n']}"
        if "mean" not in c:
            print(head, "(not enough paired seeds)")
            continue
        print(
            f"{head}, mean {c['mean']:+.4f} [{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}], "
            f"Wilcoxon p {c['p']:.4f}" + (f" (Holm {c['p_holm']:.4f})" if "p_holm" in c else "")
            + f", collapses {c['collapses'][0]}/{c['collapses'][1]}: {verdict(c, pv)}"
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
