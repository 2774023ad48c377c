"""Per-step DVP fields of a vLLM rollout: the sampler's own S, joined with its tokens.

Two sources per generated step t, both from vLLM's own sampling step:

- the step record that :class:`._processor.DvpRuleProcessor` sent before the
  token was sampled (``_channel.py``): ``|S|``, ``log Z_S`` and, when asked, the
  ascending ids of S, computed by the shared rule on the step's float32 logits;
- vLLM's output: the sampled token y and its log-prob with
  ``logprobs_mode="processed_logprobs"`` and ``logprobs=0``: ``log_softmax`` of
  the logits the sampler drew from (after our mask and temperature;
  vllm/v1/sample/ops/topk_topp_sampler.py ``forward_cpu`` / ``forward_native``,
  and ``Sampler.sample`` for all-greedy batches), which is ``log pi_S(y)``.

Then ``masked_logprob = log pi_S(y)``, ``safe_logmass = log Z_S`` and the full
``logprob = log pi_S(y) + log Z_S = log p(y)`` (tempered distribution; greedy
steps report T = 1, as the torch engine). All exact at any temperature. The
token is in S by construction (vLLM drew it with every other logit at -inf); a
non-finite masked log-prob would mean otherwise and is an error, never a flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["StepBuffer", "Steps", "chunk_fields", "read_sampled"]


@dataclass(frozen=True)
class Steps:
    """t consecutive steps of one rollout.

    Attributes:
        tokens: int64 ``(t,)`` sampled ids.
        masked: float32 ``(t,)`` vLLM's processed log-prob of each, ``log pi_S(y)``.
        records: the t step records, in step order (``_processor.step_records``).
    """

    tokens: np.ndarray
    masked: np.ndarray
    records: list[tuple[Any, ...]]

    def __len__(self) -> int:
        return len(self.tokens)


def read_sampled(flat: Any, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Sampled ids and log-probs of the first ``t`` positions of a ``FlatLogprobs``.

    With ``logprobs=0`` each position holds one row (the sampled token); a merged
    output (DELTA aggregation) holds the same row. Row 0 of each position is read.

    Returns:
        ``(ids int64 (t,), logprobs float32 (t,))``.
    """
    if t == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    starts = np.asarray(flat.start_indices[:t], dtype=np.int64)
    ids = np.asarray(flat.token_ids, dtype=np.int64)[starts]
    lps = np.asarray(flat.logprobs, dtype=np.float32)[starts]
    return ids, lps


class StepBuffer:
    """Steps received from vLLM (DELTA outputs) and not yet turned into a chunk.

    vLLM sends a rollout's first token at once and then every ``stream_interval``
    tokens (and at the end), each output holding only its new steps. The buffer
    joins those pieces and hands them out ``n`` steps at a time, so chunk
    boundaries do not depend on how vLLM cut its outputs.
    """

    def __init__(self) -> None:
        self._parts: list[Steps] = []
        self.size = 0

    def add(self, steps: Steps) -> None:
        """Append t steps."""
        if len(steps):
            self._parts.append(steps)
            self.size += len(steps)

    def take(self, n: int) -> Steps:
        """The first ``min(n, size)`` buffered steps, removed.

        Raises:
            ValueError: the buffer is empty.
        """
        if not self._parts:
            raise ValueError("no buffered steps")
        parts, self._parts, self.size = self._parts, [], 0
        if len(parts) == 1:
            joined = parts[0]
        else:
            joined = Steps(
                np.concatenate([p.tokens for p in parts]),
                np.concatenate([p.masked for p in parts]),
                [r for p in parts for r in p.records],
            )
        if n < len(joined):
            self.add(Steps(joined.tokens[n:], joined.masked[n:], joined.records[n:]))
            return Steps(joined.tokens[:n], joined.masked[:n], joined.records[:n])
        return joined

    def ready(self, n: int, finished: bool) -> list[Steps]:
        """What to turn into chunks now: ``n`` steps at a time, and at the end the rest.

        A running rollout keeps a last full ``n`` back until more steps come (or the
        end), so the final chunk is never empty when steps are left.
        """
        out = []
        while self.size > n or (self.size == n and not finished):
            out.append(self.take(n))
        if finished and self.size:
            out.append(self.take(n))
        return out


def chunk_fields(steps: Steps, with_ids: bool) -> dict[str, Any]:
    """The :class:`~..base.RolloutChunk` arrays of ``steps`` (module docstring).

    Raises:
        ValueError: a step's masked log-prob is not finite (token outside S), or a
            record lacks the ids that were asked for.
    """
    t = len(steps)
    sizes = np.fromiter((r[2] for r in steps.records), dtype=np.int64, count=t)
    logmass = np.fromiter((r[3] for r in steps.records), dtype=np.float32, count=t)
    masked = steps.masked.astype(np.float32)
    if t and not np.isfinite(masked).all():
        bad = int(np.flatnonzero(~np.isfinite(masked))[0])
        raise ValueError(f"step {steps.records[bad][1]}: sampled token outside the safe set")
    fields: dict[str, Any] = {
        "token_ids": steps.tokens.astype(np.int64),
        "logprobs": (masked + logmass).astype(np.float32),
        "masked_logprobs": masked,
        "safe_logmass": logmass,
        "safe_sizes": sizes,
        "policy_versions": np.fromiter((r[6] for r in steps.records), dtype=np.int64, count=t),
    }
    if with_ids:
        sets = [r[4] for r in steps.records]
        if any(s is None for s in sets):
            raise ValueError("a step record has no safe ids although they were asked for")
        offsets = np.zeros(t + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        ids = np.concatenate(sets).astype(np.int32) if t else np.zeros(0, np.int32)
        fields["safe_ids"], fields["safe_offsets"] = ids, offsets
    return fields
