"""The task of the GRPO examples (``grpo.py``, ``jax_grpo.py``, ``async_grpo.py``):
few-shot single-digit addition, its reward, and the calls that sample and evaluate it.

No trainer framework here: the torch and the JAX example share it as it is.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path
from typing import Any

from dvp_client import Client, RolloutBatch

__all__ = ["SHOTS", "STOP", "evaluate", "problem", "reward", "sample", "write_csv"]

SHOTS = ((2, 3), (4, 1), (6, 2))
STOP = "\n"


def problem(rng: random.Random) -> tuple[str, int]:
    """A few-shot addition prompt and its answer."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    shots = "".join(f"{x}+{y}={x + y}\n" for x, y in SHOTS)
    return f"{shots}{a}+{b}=", a + b


def reward(text: str | None, answer: int) -> float:
    """1.0 when the completion, stripped, is exactly the answer; else 0.0."""
    return 1.0 if text is not None and text.split(STOP)[0].strip() == str(answer) else 0.0


def sample(client: Client, args: argparse.Namespace, step: int) -> tuple[RolloutBatch, list[int]]:
    """This step's problems (the same for every run with this seed) and their rollouts:
    ``args.prompts`` problems x ``args.n``, the rule ``min_p = args.min_p`` with
    ``args.dvp`` (and every step's safe set returned), else no pruning."""
    rng = random.Random(args.seed * 1_000_003 + step)
    probs = [problem(rng) for _ in range(args.prompts)]
    batch = client.rollouts(
        [q for q, _ in probs],
        n=args.n,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        stop=[STOP],
        seed=args.seed * 1_000_003 + step,
        pruning={"min_p": args.min_p if args.dvp else 0.0},
        return_safe_token_ids=args.dvp,
    )
    return batch, [a for _, a in probs]


def evaluate(client: Client, args: argparse.Namespace) -> float:
    """Greedy accuracy on a fixed held-out set of ``args.eval_size`` problems
    (temperature 0, no pruning)."""
    rng = random.Random(-1 - args.seed)
    probs = [problem(rng) for _ in range(args.eval_size)]
    batch = client.rollouts(
        [q for q, _ in probs],
        temperature=0.0,
        max_tokens=args.max_tokens,
        stop=[STOP],
        pruning={"min_p": 0.0},
    )
    return sum(reward(r.text, probs[r.prompt_index][1]) for r in batch.rollouts) / len(probs)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """``rows`` as a CSV with every key any row has, in first-seen order."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
