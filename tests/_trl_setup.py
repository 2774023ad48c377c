"""What the TRL tests share: the prompts and the ``GRPOConfig`` of a short CPU run on the
tiny model (an fp32 trainer, no reference-KL term, nothing saved or reported)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
