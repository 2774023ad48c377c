"""The checks every engine makes on a rollout before it queues it (one place, both engines).

The service checks requests first and names the field (``service/serving.py``);
these are the engine's own contract, for callers that skip the service (tests,
benchmarks) and as a last guard.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import EngineParams

__all__ = ["checked_prompt"]


def checked_prompt(
    prompt: Sequence[int], params: EngineParams, vocab_size: int, max_model_len: int
) -> list[int]:
    """The prompt's ids as ints, after checking them and the sampling parameters.

    Raises:
        ValueError: an empty prompt, an id outside ``[0, vocab_size)``, a prompt that
            leaves no room in the context, a negative or NaN temperature, or
            ``max_tokens < 1``.
    """
    if not prompt:
        raise ValueError("prompt_token_ids must not be empty")
    ids = [int(t) for t in prompt]
    bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(
            f"prompt_token_ids[{bad}] = {ids[bad]} is outside the vocabulary [0, {vocab_size})"
        )
    if len(ids) >= max_model_len:
        raise ValueError(
            f"prompt has {len(ids)} tokens; the model's context is {max_model_len} "
            f"(prompt + at least one new token)"
        )
    if not params.temperature >= 0:  # also catches NaN
        raise ValueError(f"temperature must be >= 0, got {params.temperature}")
    if params.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {params.max_tokens}")
    return ids
