"""One process of the two-process TRL run in ``tests/test_trl_multiprocess.py``.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2
tests/_trl_ddp_worker.py MODEL_DIR BASE_URL WEIGHTS_DIR OUT_DIR``: two CPU processes
(gloo), two GRPO steps of :class:`DVPGRPOTrainer` against the server. Each step's
generation is 3 prompts x 4 generations = 12 rows, 6 per process, so the middle
prompt's group is split 2 + 2 across the processes. Each process writes
``OUT_DIR/rank<i>.json``: per generation its prompts, completion ids and the rows'
policy versions; per loss call the max |trainer - engine| masked log-prob; its
``policy_versions``; and a hash of its final parameters.
"""

from __future__ import annotations

import hashlib
import json
import sys
import zlib
from pathlib import Path
from typing import Any

import torch
from _trl_setup import PROMPTS, grpo_config
from datasets import Dataset
from dvp_client import Client
from dvp_client.integrations.trl import DVPGRPOTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer


def hash_reward(completions: list[str], **_: Any) -> list[float]:
    """A reward that varies within a group (the tiny random model solves nothing)."""
    return [float(zlib.crc32(c.encode()) % 2) for c in completions]


class Recording(DVPGRPOTrainer):
    generations: list[dict[str, Any]]
    gaps: list[float]

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)
        rows = out["dvp_rollouts"]
        self.generations.append(
            {
                "prompts": [x["prompt"] for x in inputs],
                "completions": [r.token_ids for r in rows],
                "versions": [r.policy_version for r in rows],
            }
        )
        return out

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        loss = super()._compute_loss(model, inputs)
        assert self.last_dvp_step is not None
        t, mask = self.last_dvp_step["tensors"], self.last_dvp_step["mask"]
        assert bool(mask.any())
        gap = (self.last_dvp_step["logprobs"] - t.engine_masked_logprobs)[mask].abs().max()
        self.gaps.append(float(gap))
        return loss


def main(model_dir: str, url: str, weights_dir: str, out_dir: str) -> None:
    prompts = PROMPTS
    args = grpo_config(Path(out_dir) / "trainer", batch=6, steps=2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = Recording(
        model,
        hash_reward,
        client=Client(url, timeout=600),
        pruning={"min_p": 0.05},
        weights_dir=weights_dir,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.generations, trainer.gaps = [], []
    trainer.train()
    digest = hashlib.sha256()
    for p in trainer.model.parameters():
        digest.update(p.detach().cpu().numpy().tobytes())
    rank = trainer.accelerator.process_index
    record = {
        "num_processes": trainer.accelerator.num_processes,
        "generations": trainer.generations,
        "gaps": trainer.gaps,
        "policy_versions": trainer.policy_versions,
        "params": digest.hexdigest(),
    }
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:5])
