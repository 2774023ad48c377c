"""GRPO with TRL's trainer on dvp-serve: the task of examples/grpo.py, through DVPGRPOTrainer.

Task: few-shot one-digit addition (``"2+3=5\\n4+1=5\\n6+2=8\\n7+5="``); reward 1 when
the completion up to the newline is exactly the sum (``examples/grpo.py``'s
``problem`` and ``reward``). :class:`dvp_client.integrations.trl.DVPGRPOTrainer`
samples each step's rollouts from the running server under the DVP rule
(``min_p = --min-p``), pushes the policy before each generation, and trains on the
pruned objective over the engine's safe sets; TRL logs reward and the DVP metrics
(``mismatch/k3_pruned``, ``dvp/safe_size_mean``, ``dvp/policy/clip_frac``, ...).

Run (two terminals, from the repository root; ``pip install -e '.[server,trl]'``)::

    mkdir -p /tmp/dvp-weights
    dvp-serve --engine torch --port 8000 --weights-root /tmp/dvp-weights
    python examples/trl_grpo.py --url http://127.0.0.1:8000 \\
        --weights-dir /tmp/dvp-weights/trl --steps 20 --out runs/trl
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch


def grpo_example() -> ModuleType:
    """examples/grpo.py, for its task (``problem``, ``reward``, ``STOP``)."""
    path = Path(__file__).with_name("grpo.py")
    spec = importlib.util.spec_from_file_location("grpo_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="smollm2", help="the served model (smollm2 or a directory)")
    p.add_argument("--weights-dir", type=Path, required=True, help="inside --weights-root")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts", type=int, default=8, help="problems per step")
    p.add_argument("--n", type=int, default=8, help="rollouts per problem (the GRPO group)")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=1e-3, help="DVP rho")
    p.add_argument("--correction", default="none", help="rollout correction of policy_loss")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("trl-grpo-out"))
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Any:
    """Train; returns the trainer (its ``state.log_history`` holds the logged metrics)."""
    from datasets import Dataset
    from dvp_client import Client
    from dvp_client.integrations.trl import DVPGRPOTrainer
    from dvp_client.train.losses import PolicyLossConfig
    from dvp_server.model_store import resolve_model  # the files the server loaded
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    task = grpo_example()
    rng = random.Random(args.seed)
    probs = [task.problem(rng) for _ in range(args.prompts * args.steps)]
    data = Dataset.from_dict({"prompt": [q for q, _ in probs], "answer": [a for _, a in probs]})

    def reward(completions: list[str], answer: list[int], **_: Any) -> list[float]:
        return [task.reward(c, a) for c, a in zip(completions, answer, strict=True)]

    model_dir = resolve_model(args.model)
    config = GRPOConfig(
        output_dir=str(args.out),
        per_device_train_batch_size=args.prompts * args.n,
        num_generations=args.n,
        max_completion_length=args.max_tokens,
        max_steps=args.steps,
        learning_rate=args.lr,
        temperature=args.temperature,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        beta=0.0,
        bf16=False,  # an fp32 trainer (TRL's default is bf16 mixed precision)
    )
    trainer = DVPGRPOTrainer(
        AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32),
        reward,
        client=Client(args.url, timeout=1800),
        pruning={"min_p": args.min_p},
        weights_dir=args.weights_dir,
        loss_config=PolicyLossConfig(correction=args.correction, aggregation="seq-mean-token-mean"),
        stop=[task.STOP],
        args=config,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(str(model_dir)),
    )
    trainer.train()
    return trainer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    trainer = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    history = json.dumps(trainer.state.log_history, indent=1)
    (args.out / "log_history.json").write_text(history + "\n")
    for row in trainer.state.log_history:
        if "reward" in row:
            print(
                f"step {row['step']:3d} v{row.get('dvp/policy_version', 0):.0f} "
                f"reward {row['reward']:.3f} k3 {row.get('mismatch/k3_pruned', float('nan')):.2e} "
                f"|S| {row.get('dvp/safe_size_mean', float('nan')):.0f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
