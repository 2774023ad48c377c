"""Summary of the FP8 GRPO runs: python docs/grpo-fp8/summarize.py [docs/grpo-fp8].

Reads ``<arm>-s<seed>/steps.csv`` (``examples/grpo.py`` logs) and prints two markdown
tables. Per arm, over its seeds: sampled reward over the first and second half of the
steps and greedy held-out accuracy at the start and end (mean over seeds, range in
brackets), each run's mean K3 per step and mean largest ``|log ratio|`` per step (mean
+- standard deviation over seeds), steps with a token ``|log ratio|`` > 1, mean gradient
norm and pruned mass. Then one row per run: steps done, sampled reward (first / last
step), greedy held-out accuracy per eval, K3 per step (mean / max), ``|log ratio|`` p99
(median step) and max over steps, steps whose largest token ``|log ratio|`` exceeds 1 (a
ratio beyond e), the largest step q0.999 of the importance weight, mean gradient norm,
mean ``|S|`` and pruned mass.
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path


def summarize(path: Path) -> str:
    rows = list(csv.DictReader(path.open()))
    train = [r for r in rows if r.get("k3")]
    evals = [f"{float(r['eval_acc']):.2f}" for r in rows if r.get("eval_acc")]
    f = lambda key: [float(r[key]) for r in train]  # noqa: E731
    k3, p99, mx = f("k3"), f("abs_logratio_p99"), f("abs_logratio_max")
    cells = [
        path.parent.name,
        str(len(train)),
        " / ".join(f"{x:.2f}" for x in (f("reward_mean")[0], f("reward_mean")[-1])),
        " / ".join(evals),
        f"{statistics.mean(k3):.1e} / {max(k3):.1e}",
        f"{statistics.median(p99):.2f}",
        f"{max(mx):.2f}",
        str(sum(x > 1 for x in mx)),
        f"{max(f('is_weight_q0.999')):.2f}",
        f"{statistics.mean(f('grad_norm')):.2f}",
        f"{statistics.mean(f('safe_size_mean')):.0f}",
        f"{100 * statistics.mean(f('pruned_mass')):.1f} %",
    ]
    return "| " + " | ".join(cells) + " |"


def _mean_range(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def _mean_sd(xs: list[float], fmt: str = "{:.2f}") -> str:
    """Mean +- standard deviation over runs (just the value for one run)."""
    if len(xs) < 2:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} +- {fmt.format(statistics.stdev(xs))}"


def pooled(arm: str, paths: list[Path]) -> str:
    """One row for an arm: its runs pooled (only runs with every step logged)."""
    runs = [list(csv.DictReader(p.open())) for p in paths]
    trains = [[r for r in rows if r.get("k3")] for rows in runs]
    evals = [[float(r["eval_acc"]) for r in rows if r.get("eval_acc")] for rows in runs]
    half = len(trains[0]) // 2
    reward = [[float(r["reward_mean"]) for r in t] for t in trains]
    every = [r for t in trains for r in t]
    col = lambda key: [float(r[key]) for r in every]  # noqa: E731
    cells = [
        arm,
        f"{len(paths)} x {len(trains[0])}",
        _mean_range([statistics.mean(x[:half]) for x in reward]),
        _mean_range([statistics.mean(x[half:]) for x in reward]),
        _mean_range([e[0] for e in evals]),
        _mean_range([e[-1] for e in evals]),
        _mean_sd([statistics.mean(float(r["k3"]) for r in t) for t in trains], "{:.4f}"),
        _mean_sd([statistics.mean(float(r["abs_logratio_max"]) for r in t) for t in trains]),
        f"{sum(x > 1 for x in col('abs_logratio_max'))} of {len(every)}",
        f"{max(col('is_weight_q0.999')):.2f}",
        f"{statistics.mean(col('grad_norm')):.2f}",
        f"{100 * statistics.mean(col('pruned_mass')):.1f} %",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/grpo-fp8")
    arms: dict[str, list[Path]] = {}
    for path in sorted(root.glob("*-s*/steps.csv")):
        arms.setdefault(path.parent.name.rsplit("-s", 1)[0], []).append(path)
    print(
        "| arm | seeds x steps | reward, first half | reward, second half | greedy acc, start "
        "| greedy acc, end | K3 per step, run mean | max \\|d\\| per step, run mean "
        "| steps max \\|d\\| > 1 "
        "| max q0.999 weight | grad norm mean | pruned mass |"
    )
    print("|" + " --- |" * 12)
    for arm, paths in arms.items():
        full = [p for p in paths if len(p.read_text().splitlines()) > 2]
        steps = {len([r for r in csv.DictReader(p.open()) if r.get("k3")]) for p in full}
        if full and len(steps) == 1:
            print(pooled(arm, full))
    print()
    print(
        "| run | steps | reward first / last step | greedy acc per eval | K3 mean / max "
        "| \\|d\\| p99 median step | max \\|d\\| | steps max \\|d\\| > 1 | max q0.999 weight "
        "| grad norm mean | mean \\|S\\| | pruned mass |"
    )
    print("|" + " --- |" * 12)
    for path in sorted(root.glob("*-s*/steps.csv")):
        print(summarize(path))


if __name__ == "__main__":
    main()
