"""Per-arm summary of the FP8 GRPO runs: python docs/grpo-fp8/summarize.py [docs/grpo-fp8].

Reads ``<arm>-s<seed>/steps.csv`` (``examples/grpo.py`` logs) and prints one markdown row
per run: steps done, sampled reward (first / last step), greedy held-out accuracy per
eval, K3 per step (mean / max), ``|log ratio|`` p99 (median step) and max over steps,
steps whose largest token ``|log ratio|`` exceeds 1 (a ratio beyond e), the largest
step q0.999 of the importance weight, mean gradient norm, mean ``|S|`` and pruned mass.
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


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/grpo-fp8")
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
