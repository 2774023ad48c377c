"""Sampling and scoring for ``dvp-diagnose``: rollouts from a server, the trainer's fp32 view.

- :func:`sample_setting` requests rollouts for one pruning rule (streamed, so a
  progress bar can count tokens as they decode) and returns the joined batches.
- :class:`Reference` holds the trainer-side model in float32 (the same weights as
  the server: :func:`dvp_server.model_store.resolve_model`) and, on demand, a copy
  in the engine's dtype for the whole-vocabulary comparison.
- :func:`score_batches` teacher-forces every batch through the fp32 model and
  computes the pruned log-probs with :func:`dvp_client.train.objective.pruned_logprobs`
  (replay mode: the engine's own safe sets), padded to one ``[N, T_max]`` layout.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from dvp_client import Client, RolloutBatch, join_rollout_stream
from dvp_client.train.objective import pruned_logprobs
from dvp_client.train.tensors import RolloutTensors
from dvp_schemas import RolloutStreamChunk
from torch import Tensor

__all__ = [
    "DEFAULT_PROMPTS",
    "Reference",
    "Scored",
    "chat_prompts",
    "sample_setting",
    "score_batches",
]

logger = logging.getLogger(__name__)

# Varied chat prompts: open questions, instructions, arithmetic, code; the chat template
# is applied server side. Cycled when more prompts are asked for.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "Write a short story about a lighthouse keeper.",
    "What is 17 * 23? Explain step by step.",
    "Give three tips for learning a new language.",
    "Explain what a hash table is to a beginner.",
    "Write a Python function that reverses a string.",
    "What causes the seasons on Earth?",
    "Describe your ideal weekend in a few sentences.",
    "List five fruits and one fact about each.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Why is the sky blue?",
    "Write a haiku about autumn rain.",
    "What is the difference between weather and climate?",
    "Summarise the plot of Romeo and Juliet in three sentences.",
    "How do I make a cup of tea?",
    "Name some uses of the number zero in mathematics.",
    "Write an email asking a colleague for a meeting next week.",
)


def chat_prompts(count: int) -> list[list[dict[str, str]]]:
    """``count`` chat prompts (single user messages), cycling :data:`DEFAULT_PROMPTS`."""
    return [
        [{"role": "user", "content": DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)]}]
        for i in range(count)
    ]


def sample_setting(
    client: Client,
    prompts: Sequence[Any],
    *,
    n: int,
    rule: dict[str, float],
    temperature: float,
    max_tokens: int,
    seed: int,
    prompts_per_request: int,
    on_tokens: Callable[[int], None] | None = None,
) -> list[RolloutBatch]:
    """Sample ``n`` rollouts per prompt under ``rule``, one streamed request per prompt chunk.

    Request ``k`` uses seed ``seed + k``: the same prompts and seeds for every rule, so
    settings differ only by the rule.

    Args:
        client: a client of the running server.
        prompts: the prompts (any form the server accepts).
        n: samples per prompt.
        rule: the pruning rule, e.g. ``{"min_p": 1e-3}`` (``{"min_p": 0.0}``: no DVP).
        temperature: T > 0.
        max_tokens: tokens per rollout, at most.
        seed: base seed.
        prompts_per_request: prompts in each request.
        on_tokens: called with the number of tokens of every chunk as it arrives.

    Returns:
        The joined batch of every request, in order.
    """
    prunes = rule.get("min_p", 0.0) > 0
    out = []
    for k, start in enumerate(range(0, len(prompts), prompts_per_request)):
        events = []
        stream = client.stream_rollouts(
            list(prompts[start : start + prompts_per_request]),
            n=n,
            temperature=temperature,
            max_tokens=max_tokens,
            seed=seed + k,
            pruning=rule,
            return_safe_token_ids=prunes,
            return_text=False,
        )
        for event in stream:
            events.append(event)
            if on_tokens is not None and isinstance(event, RolloutStreamChunk):
                on_tokens(len(event.token_ids))
        out.append(join_rollout_stream(events))
    return out


@dataclass
class Reference:
    """The trainer's reference model (float32) and, lazily, a copy in the engine's dtype.

    Args:
        model_dir: a transformers directory (from ``resolve_model``).
        engine_dtype: the engine's dtype name (``"bfloat16"``, ``"float16"``, ``"float32"``).
        quantization: the engine's weight quantization as ``/v1/models`` reports it
            (``"fp8-e4m3-block128"``, ``"fp8-e4m3-channel"``) or None; the engine-dtype
            copy rounds its linears the same way (``engines/torch/_fp8.py``).
    """

    model_dir: Path
    engine_dtype: str
    quantization: str | None = None
    model: Any = field(init=False)
    _engine_copy: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.float32)
        self.model.eval()

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def engine_copy(self) -> Any:
        """The same weights loaded in the engine's dtype, as the torch engine loads them.

        Raises:
            ValueError: a quantization this copy cannot reproduce.
        """
        if self._engine_copy is None:
            from transformers import AutoModelForCausalLM

            from ..engines.torch import _fp8

            dtype = getattr(torch, self.engine_dtype)
            if self.quantization is None:
                model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=dtype)
            else:
                model = copy.deepcopy(self.model)  # float32, rounded from float32 as served
                _fp8.round_model(model, dtype, _fp8.reported_mode(self.quantization))
            self._engine_copy = model.eval()
        return self._engine_copy


def completion_logits(model: Any, bt: RolloutTensors, rows: Tensor | None = None) -> Tensor:
    """Teacher-forced logits predicting each completion step, ``[b, T, V]`` in the model's dtype.

    Args:
        model: a causal LM.
        bt: the batch (left-padded prompts, right-padded completions).
        rows: int64 row indices to run (default: all rows).
    """
    sel = slice(None) if rows is None else rows
    t = bt.tokens.shape[1]
    with torch.inference_mode():
        out = model(
            input_ids=bt.input_ids[sel],
            attention_mask=bt.attention_mask[sel],
            position_ids=bt.position_ids[sel],
            logits_to_keep=t + 1,
        )
    return out.logits[:, :t]  # (b, T, V): the last T + 1 positions, minus the final one


@dataclass(frozen=True)
class Scored:
    """Engine and trainer values of every sampled token of one setting, ``[N, T_max]``.

    Attributes:
        mask: bool, generated steps.
        engine_masked, trainer_masked: ``log pi_S(y)`` (engine: ``masked_logprobs``;
            trainer: fp32 replay of the engine's sets).
        engine_full, trainer_full: ``log p(y)`` (engine NaN where null).
        engine_logmass, trainer_logmass: ``log Z_S`` (engine NaN where null).
        safe_sizes: int64 engine ``|S|``.
    """

    mask: Tensor
    engine_masked: Tensor
    trainer_masked: Tensor
    engine_full: Tensor
    trainer_full: Tensor
    engine_logmass: Tensor
    trainer_logmass: Tensor
    safe_sizes: Tensor

    @property
    def log_ratio(self) -> Tensor:
        """``d = log pi_S(y) - log mu_S(y)`` (trainer over engine), 0 off the mask."""
        return torch.where(self.mask, self.trainer_masked - self.engine_masked, 0.0)


def _pad(x: Tensor, width: int, fill: float | int | bool) -> Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=fill)


def score_batches(
    ref: Reference,
    batches: Sequence[RolloutBatch],
    max_tokens: int,
    on_batch: Callable[[], None] | None = None,
) -> Scored:
    """Score every batch with the fp32 model (replay mode) and stack them ``[N, max_tokens]``.

    Raises:
        ValueError: a rollout longer than ``max_tokens``, or a sampled token outside
            its replayed set (from :func:`pruned_logprobs`, naming batch and step).
    """
    parts: dict[str, list[Tensor]] = {k: [] for k in Scored.__dataclass_fields__}
    for batch in batches:
        bt = batch.to_torch(pad_id=0)
        if bt.tokens.shape[1] > max_tokens:
            raise ValueError(f"a rollout has {bt.tokens.shape[1]} tokens, max_tokens {max_tokens}")
        if bt.safe is None:
            raise ValueError("the server returned no safe sets for a pruned rule")
        logits = completion_logits(ref.model, bt)
        res = pruned_logprobs(logits, bt.tokens, bt.safe, mask=bt.loss_mask)
        assert res.full_logprobs is not None and res.log_z is not None
        values = {
            "mask": (bt.loss_mask, False),
            "engine_masked": (bt.engine_masked_logprobs, 0.0),
            "trainer_masked": (res.logprobs, 0.0),
            "engine_full": (bt.engine_logprobs, 0.0),
            "trainer_full": (res.full_logprobs, 0.0),
            "engine_logmass": (bt.engine_safe_logmass, 0.0),
            "trainer_logmass": (res.log_z, 0.0),
            "safe_sizes": (bt.safe_sizes, 0),
        }
        for name, (x, fill) in values.items():
            parts[name].append(_pad(x.detach(), max_tokens, fill))
        if on_batch is not None:
            on_batch()
    return Scored(**{k: torch.cat(v) for k, v in parts.items()})
