"""Engine chunks -> one columnar :class:`dvp_schemas.Rollout`.

An engine streams a rollout as :class:`~dvp_server.engines.base.RolloutChunk` s
(numpy arrays over the steps since the previous chunk); the response holds one
array per field over all steps. Joining checks the engine contract on the way:
one policy version per rollout, equal-length columns, consistent CSR safe sets.
NaN (a value the engine cannot give exactly) becomes JSON null.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from dvp_schemas import Rollout, SafeTokenIds

from ..engines.base import EngineError, RolloutChunk

__all__ = ["assemble_rollout"]


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    """float array -> list with NaN as None (JSON null)."""
    return [None if math.isnan(x) else x for x in values.astype(np.float64).tolist()]


def _join_csr(rollout: str, chunks: list[RolloutChunk]) -> SafeTokenIds:
    """Concatenate the chunks' CSR safe sets (each chunk's offsets start at 0)."""
    ids: list[np.ndarray] = []
    offsets: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
    base = 0
    for c in chunks:
        if c.safe_ids is None or c.safe_offsets is None:
            raise EngineError(f"rollout {rollout}: safe ids were asked for but not returned")
        if len(c.safe_offsets) != len(c.token_ids) + 1 or int(c.safe_offsets[-1]) != len(
            c.safe_ids
        ):
            raise EngineError(f"rollout {rollout}: inconsistent CSR safe ids in a chunk")
        ids.append(c.safe_ids)
        offsets.append(np.asarray(c.safe_offsets[1:], dtype=np.int64) + base)
        base += len(c.safe_ids)
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)
    return SafeTokenIds(ids=flat.tolist(), offsets=np.concatenate(offsets).tolist())


def _strip_stop(text: str, stop_reason: str | int | None) -> str:
    """The text before the stop string that ended the rollout (if it did)."""
    if isinstance(stop_reason, str) and (cut := text.find(stop_reason)) >= 0:
        return text[:cut]
    return text


def assemble_rollout(
    rollout_id: str,
    chunks: list[RolloutChunk],
    *,
    prompt_index: int,
    sample_index: int,
    prompt_ids: list[int],
    seed: int,
    tokenizer: Any | None,
    with_logprobs: bool,
    with_logmass: bool,
    with_safe_ids: bool,
) -> Rollout:
    """Join one rollout's chunks into the columnar :class:`Rollout`.

    Args:
        rollout_id: for error messages.
        chunks: the engine's chunks, the last with ``finish_reason`` set.
        prompt_index, sample_index: the rollout's place in the request.
        prompt_ids: the prompt as the engine saw it.
        seed: the request seed echoed in the rollout.
        tokenizer: decodes the text (special tokens skipped); None: no text.
        with_logprobs, with_logmass: the engine returns these fields (its
            capabilities); else they are null.
        with_safe_ids: the request asked for the safe sets (CSR).

    Raises:
        EngineError: the chunks break the engine contract (mixed policy versions,
            ragged arrays, missing safe ids).
    """
    versions = {c.policy_version for c in chunks}
    if len(versions) != 1:  # the engine must never mix weights inside a rollout
        raise EngineError(f"rollout {rollout_id} mixes policy versions {sorted(versions)}")
    for c in chunks:
        n = len(c.token_ids)
        cols = (c.logprobs, c.masked_logprobs, c.safe_logmass, c.safe_sizes)
        if any(len(a) != n for a in cols):
            raise EngineError(f"rollout {rollout_id}: a chunk has arrays of different lengths")

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(c, name) for c in chunks])

    token_ids = cat("token_ids").astype(np.int64).tolist()
    last = chunks[-1]
    text = None
    if tokenizer is not None:
        text = _strip_stop(tokenizer.decode(token_ids, skip_special_tokens=True), last.stop_reason)
    return Rollout(
        prompt_index=prompt_index,
        sample_index=sample_index,
        prompt_token_ids=prompt_ids,
        token_ids=token_ids,
        text=text,
        logprobs=_nan_to_none(cat("logprobs")) if with_logprobs else None,
        masked_logprobs=cat("masked_logprobs").astype(np.float64).tolist(),
        safe_logmass=_nan_to_none(cat("safe_logmass")) if with_logmass else None,
        safe_sizes=cat("safe_sizes").astype(np.int64).tolist(),
        safe_token_ids=_join_csr(rollout_id, chunks) if with_safe_ids else None,
        finish_reason=last.finish_reason or "error",
        stop_reason=last.stop_reason,
        policy_version=versions.pop(),
        seed=seed,
        outside_safe_set=_outside_steps(chunks),
    )


def _outside_steps(chunks: list[RolloutChunk]) -> list[int] | None:
    """Step indices flagged ``outside_safe_set`` by the engine; None if it flags nothing."""
    if all(c.outside_safe_set is None for c in chunks):
        return None
    flags = [
        c.outside_safe_set if c.outside_safe_set is not None else np.zeros(len(c.token_ids), bool)
        for c in chunks
    ]
    return np.flatnonzero(np.concatenate(flags)).tolist()
