"""Engine chunks -> one columnar :class:`dvp_schemas.Rollout`.

An engine streams a rollout as :class:`~dvp_server.engines.base.RolloutChunk` s
(numpy arrays over the steps since the previous chunk); the response holds one
array per field over all steps. Joining checks the engine contract on the way:
token versions that never go back (spans), equal-length columns, consistent CSR safe sets.
NaN (a value the engine cannot give exactly) becomes JSON null. Safe sets go out
in the request's format (:func:`wire_safe_ids`): a step whose set is the whole
vocabulary becomes the marker (an empty row, or no bytes when packed) whether the
engine listed its V ids or left its row empty.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from dvp_client.safe_ids import encode_packed, step_kinds
from dvp_client.versions import spans_from_versions
from dvp_schemas import PackedSafeTokenIds, Rollout, SafeTokenIds, SafeTokenIdsFormat

from ..engines.base import EngineError, RolloutChunk

__all__ = ["assemble_rollout", "nan_to_null", "wire_safe_ids"]


def nan_to_null(values: np.ndarray, *, infinite: bool = False) -> list[float | None]:
    """float array -> list with NaN (and, with ``infinite``, +-inf) as None (JSON null)."""
    floats = values.astype(np.float64).tolist()
    if infinite:
        return [x if math.isfinite(x) else None for x in floats]
    return [None if math.isnan(x) else x for x in floats]


_nan_to_none = nan_to_null


def wire_safe_ids(
    offsets: np.ndarray,
    ids: np.ndarray,
    sizes: np.ndarray,
    vocab_size: int,
    fmt: SafeTokenIdsFormat,
) -> SafeTokenIds | PackedSafeTokenIds:
    """CSR safe sets (``offsets`` ``(t + 1,)``, ``ids``, ``sizes`` ``(t,)``) in wire format.

    Full steps (``sizes == vocab_size``) lose their ids: an empty row (``"list"``)
    or no bytes (``"packed"``).

    Raises:
        ValueError: rows that disagree with ``sizes`` or ids outside the vocabulary.
    """
    full, _ = step_kinds(sizes, vocab_size)
    lengths = np.diff(offsets)
    if full.any():  # drop the listed ids of full steps
        keep = ~np.repeat(full, lengths)
        ids = ids[keep]
        offsets = np.concatenate([[0], np.cumsum(np.where(full, 0, lengths))])
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"safe-set ids outside the vocabulary [0, {vocab_size})")
    if fmt == "packed":
        data = encode_packed(offsets, ids, sizes, vocab_size)
        return PackedSafeTokenIds(vocab_size=vocab_size, data=data)
    if not np.array_equal(np.diff(offsets), np.where(full, 0, sizes)):
        raise ValueError("CSR rows disagree with safe_sizes")
    return SafeTokenIds(ids=ids.tolist(), offsets=offsets.tolist(), vocab_size=vocab_size)


def _join_csr(
    rollout: str, chunks: list[RolloutChunk], vocab_size: int, fmt: SafeTokenIdsFormat
) -> SafeTokenIds | PackedSafeTokenIds:
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
    flat = np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, dtype=np.int64)
    sizes = np.concatenate([c.safe_sizes for c in chunks]).astype(np.int64)
    try:
        return wire_safe_ids(np.concatenate(offsets), flat, sizes, vocab_size, fmt)
    except ValueError as exc:
        raise EngineError(f"rollout {rollout}: {exc}") from exc


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
    vocab_size: int,
    safe_format: SafeTokenIdsFormat = "list",
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
        with_safe_ids: the request asked for the safe sets.
        vocab_size: V (a step with V ids is sent as the whole-vocabulary marker).
        safe_format: the request's ``safe_token_ids_format``.

    Raises:
        EngineError: the chunks break the engine contract (token versions that go back,
            ragged arrays, missing or inconsistent safe ids).
    """
    for c in chunks:
        n = len(c.token_ids)
        cols = (c.logprobs, c.masked_logprobs, c.safe_logmass, c.safe_sizes)
        if any(len(a) != n for a in cols):
            raise EngineError(f"rollout {rollout_id}: a chunk has arrays of different lengths")

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(c, name) for c in chunks])

    versions = [c.versions() for c in chunks]
    pv = np.concatenate([v[0] for v in versions])
    kv = np.concatenate([v[1] for v in versions])
    if np.any(np.diff(pv) < 0) or np.any(kv > pv):
        raise EngineError(f"rollout {rollout_id}: token versions go back or KV is newer")
    spans = spans_from_versions(pv, kv)
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
        safe_token_ids=(
            _join_csr(rollout_id, chunks, vocab_size, safe_format) if with_safe_ids else None
        ),
        finish_reason=last.finish_reason or "error",
        stop_reason=last.stop_reason,
        policy_version=spans[0][1] if spans else chunks[-1].policy_version,
        version_spans=spans,
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
