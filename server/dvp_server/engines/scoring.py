"""Teacher-forced scoring (``POST /v1/score``): the engine side.

An engine that can score implements :class:`Scorer`: given (prompt, completion)
token sequences and the rule, it returns for every completion token y_t the
per-step fields of a rollout, computed from the logits that predict y_t when
the model reads the given sequence (teacher forcing), plus whether y_t lies in
S_t (a given token may not: then ``masked`` is -inf).

:func:`score_sequences` is the torch implementation (the reference engine
calls it under its model lock): one left-padded forward per micro-batch of
sequences, positions counted over real tokens only (as the decoding batch
does, so a sequence's logits match the ones it was sampled with up to float
rounding), then the shared rule (:func:`dvp_client.train.rule.safe_vocab`) on the
logits of the completion positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from dvp_client.train.rule import safe_vocab
from dvp_schemas import PruningRule

__all__ = ["ScoreParams", "ScoredSequence", "Scorer", "score_sequences"]

#: Most (sequence x kept position) logit rows per forward: 1024 rows of a 49152
#: vocabulary are 200 MB of float32 logits (a longer completion gets a forward alone).
LOGIT_ROWS_PER_FORWARD = 1024
#: Most steps per rule call (the rule makes a few (N, V) temporaries).
RULE_ROWS = 512


@dataclass(frozen=True)
class ScoreParams:
    """How to score: temperature, rule, and what to return."""

    temperature: float
    rule: PruningRule
    return_safe_token_ids: bool = False
    top_logprobs: int = 0


@dataclass
class ScoredSequence:
    """Per-step arrays (length T, the completion's tokens) of one scored sequence.

    Attributes:
        logprobs: float32 ``(T,)`` log p(y_t), full tempered distribution; NaN where
            the engine cannot give it exactly.
        masked: float32 ``(T,)`` log pi_S(y_t); -inf where y_t is not in S_t.
        in_safe_set: bool ``(T,)``.
        logmass: float32 ``(T,)`` log Z_S; NaN where not exact.
        sizes: int64 ``(T,)`` |S_t|.
        safe_ids: int32 flat ids of every S_t (ascending per step), or None.
        safe_offsets: int64 ``(T + 1,)`` CSR offsets, or None.
        top_ids: int64 ``(T, k)`` the k most probable tokens, descending, or None.
        top_logprobs: float32 ``(T, k)`` their log-probs (NaN where not exact), or None.
        policy_version: the weights version the sequence was scored with.
    """

    logprobs: np.ndarray
    masked: np.ndarray
    in_safe_set: np.ndarray
    logmass: np.ndarray
    sizes: np.ndarray
    safe_ids: np.ndarray | None = None
    safe_offsets: np.ndarray | None = None
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    policy_version: int = 0


@runtime_checkable
class Scorer(Protocol):
    """Optional engine capability: teacher-forced scoring (``POST /v1/score``).

    The serving layer checks the sequences (vocabulary, context length) first.
    An engine without it answers ``POST /v1/score`` with 501.
    """

    async def score(
        self, sequences: Sequence[tuple[list[int], list[int]]], params: ScoreParams
    ) -> list[ScoredSequence]: ...


def _micro_batches(sequences: Sequence[tuple[list[int], list[int]]]) -> list[list[int]]:
    """Indices of consecutive sequences whose kept logits fit LOGIT_ROWS_PER_FORWARD."""
    batches: list[list[int]] = []
    current: list[int] = []
    widest = 0
    for i, (_, completion) in enumerate(sequences):
        width = max(widest, len(completion) + 1)
        if current and width * (len(current) + 1) > LOGIT_ROWS_PER_FORWARD:
            batches.append(current)
            current, width = [], len(completion) + 1
        current.append(i)
        widest = width
    if current:
        batches.append(current)
    return batches


def _step_logits(
    model: Any, sequences: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> torch.Tensor:
    """Logits that predict every completion token, stacked: ``(sum T_i, V)``.

    Left-padded batch of prompt + completion; ``position_ids = cumsum(mask) - 1``
    (as ``DecodeBatch.prefill``). With ``m = max T_i + 1`` kept positions, step t
    of sequence i (T_i tokens) is predicted at kept index ``m - 1 - T_i + t``.
    """
    lens = [len(p) + len(c) for p, c in sequences]
    b, width = len(sequences), max(lens)
    ids = torch.full((b, width), pad_id, dtype=torch.int64)
    mask = torch.zeros((b, width), dtype=torch.int64)
    for i, (p, c) in enumerate(sequences):
        ids[i, width - lens[i] :] = torch.tensor(p + c, dtype=torch.int64)
        mask[i, width - lens[i] :] = 1
    pos = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)  # (B, L)
    m = max(len(c) for _, c in sequences) + 1
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=m)
    logits = out.logits  # (B, m, V)
    rows = [logits[i, m - 1 - len(c) : m - 1] for i, (_, c) in enumerate(sequences)]  # (T_i, V)
    return torch.cat(rows, dim=0)


def _rule_rows(logits: torch.Tensor, tokens: torch.Tensor, params: ScoreParams) -> dict[str, Any]:
    """The rule on step logits ``(N, V)`` with the given tokens ``(N,)`` (numpy out)."""
    rule = params.rule
    sv = safe_vocab(
        logits,
        temperature=params.temperature,
        min_p=rule.min_p,
        top_k=rule.top_k,
        top_p=rule.top_p,
    )
    full, masked = sv.logprobs(tokens)  # (N,), (N,); masked = -inf outside S
    out: dict[str, Any] = {
        "logprobs": full.numpy(),
        "masked": masked.numpy(),
        "in_safe_set": sv.mask.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).numpy(),
        "logmass": sv.safe_logmass.numpy(),
        "sizes": sv.safe_sizes.numpy(),
    }
    if params.return_safe_token_ids:
        out["safe"] = [row.nonzero().squeeze(-1).to(torch.int32).numpy() for row in sv.mask]
    if params.top_logprobs:
        top = (sv.scaled - sv.log_z_full.unsqueeze(-1)).topk(params.top_logprobs, dim=-1)
        out["top_ids"], out["top_lps"] = top.indices.numpy(), top.values.numpy()
    return out


def score_sequences(
    model: Any,
    sequences: Sequence[tuple[list[int], list[int]]],
    params: ScoreParams,
    *,
    pad_id: int,
    policy_version: int = 0,
) -> list[ScoredSequence]:
    """Teacher-forced per-step fields of each (prompt, completion) (torch reference).

    Call under ``torch.inference_mode()`` and the engine's model lock.

    Args:
        model: a transformers causal LM (any dtype; the rule runs in float32).
        sequences: ``(prompt ids, completion ids)``, both non-empty, ids in the vocabulary.
        params: temperature, rule and what to return.
        pad_id: id written into left padding (masked out).
        policy_version: reported in every result.

    Returns:
        One :class:`ScoredSequence` per sequence, in order; every field exact.
    """
    results: list[ScoredSequence] = []
    for batch in _micro_batches(sequences):
        seqs = [sequences[i] for i in batch]
        logits = _step_logits(model, seqs, pad_id)  # (N, V)
        tokens = torch.tensor([t for _, c in seqs for t in c], dtype=torch.int64)  # (N,)
        parts = [
            _rule_rows(logits[s : s + RULE_ROWS], tokens[s : s + RULE_ROWS], params)
            for s in range(0, len(tokens), RULE_ROWS)
        ]
        cols = {k: _concat([p[k] for p in parts]) for k in parts[0]}
        start = 0
        for _, completion in seqs:
            end = start + len(completion)
            results.append(_one(cols, start, end, policy_version))
            start = end
    return results


def _concat(parts: list[Any]) -> Any:
    if isinstance(parts[0], list):
        return [x for p in parts for x in p]
    return np.concatenate(parts)


def _one(cols: dict[str, Any], start: int, end: int, version: int) -> ScoredSequence:
    """Rows ``[start, end)`` of the stacked columns as one sequence's result."""
    safe_ids = offsets = None
    if "safe" in cols:
        sets = cols["safe"][start:end]
        offsets = np.zeros(len(sets) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in sets], out=offsets[1:])
        safe_ids = np.concatenate(sets).astype(np.int32)
    return ScoredSequence(
        logprobs=cols["logprobs"][start:end],
        masked=cols["masked"][start:end],
        in_safe_set=cols["in_safe_set"][start:end],
        logmass=cols["logmass"][start:end],
        sizes=cols["sizes"][start:end].astype(np.int64),
        safe_ids=safe_ids,
        safe_offsets=offsets,
        top_ids=cols["top_ids"][start:end].astype(np.int64) if "top_ids" in cols else None,
        top_logprobs=cols["top_lps"][start:end] if "top_lps" in cols else None,
        policy_version=version,
    )
