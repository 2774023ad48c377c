"""What the TRL tests share: the prompts and the ``GRPOConfig`` of a short CPU run on the
tiny model (an fp32 trainer, no reference-KL term, nothing saved or reported), and a
short DVPGRPOTrainer run against a server that records every step (:func:`train`,
:func:`gaps`). Imports TRL: import it after ``pytest.importorskip("trl")``."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import torch
from dvp_client import Client
from dvp_client.integrations._weights import WeightPusher
from dvp_client.integrations.trl import DVPGRPOTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer

STEPS = 3
TOL = 2e-4  # trainer vs engine masked log-prob, every token

PROMPTS = [f"{a}+{b}=" for a, b in ((1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (4, 4))]


def grpo_config(out: Path, *, batch: int, steps: int, iterations: int = 1) -> Any:
    """TRL's ``GRPOConfig``: ``batch`` rows per device, groups of 4, 4-token completions."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        num_generations=4,
        max_completion_length=4,
        max_steps=steps,
        num_iterations=iterations,
        learning_rate=1e-2,
        temperature=1.0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        beta=0.0,
        bf16=False,  # an fp32 trainer (TRL's default is bf16 mixed precision)
    )


def hash_reward(completions: list[str], **_: Any) -> list[float]:
    """A reward that varies within a group (the tiny random model solves nothing)."""
    return [float(zlib.crc32(c.encode()) % 2) for c in completions]


class Recording(DVPGRPOTrainer):
    """Keeps, per loss call, the weights it ran with, its rows, advantages and loss."""

    records: list[dict[str, Any]]

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        loss = super()._compute_loss(model, inputs)
        assert self.last_dvp_step is not None
        self.records.append(
            {
                "state": state,
                "rows": inputs["dvp_rollouts"],
                "advantages": inputs["advantages"].detach().clone(),
                "old": inputs.get("dvp_old_logprobs"),
                "returned": loss.detach(),
                **self.last_dvp_step,
            }
        )
        return loss


def train(
    tiny: Path, url: str, root: Path, out: Path, push: bool, steps: int = STEPS, iterations: int = 1
) -> Recording:
    from datasets import Dataset

    prompts = PROMPTS
    args = grpo_config(out, batch=8, steps=steps, iterations=iterations)
    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    client = Client(url, timeout=600)
    if not push:  # start from the trainer's weights, then never push again
        WeightPusher(client, root / "no-push-start").push(model, "init")
    trainer = Recording(
        model,
        hash_reward,
        client=client,
        pruning={"min_p": 0.05},
        weights_dir=root / f"{'push' if push else 'no-push'}-{iterations}",
        push_weights=push,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=AutoTokenizer.from_pretrained(str(tiny)),
    )
    trainer.records = []
    trainer.train()
    return trainer


def gaps(trainer: Recording) -> list[float]:
    """Per step, max |trainer - engine| masked log-prob over the counted tokens."""
    out = []
    for r in trainer.records:
        t, mask = r["tensors"], r["mask"]
        assert bool(mask.any())
        out.append(float((r["logprobs"] - t.engine_masked_logprobs)[mask].abs().max()))
    return out
