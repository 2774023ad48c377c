"""One rule step of the torch engine: the shared rule on a batch's logits, one draw per row.

Shapes: B rows, V vocabulary. The rows' parameters are gathered once per batch
composition (:class:`BatchRule`); a batch whose rows all sample with min-p alone
takes the sparse path (``dvp_client.train.rule_sparse``), any other the dense rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from dvp_client.train.rule import RuleParams, safe_vocab
from dvp_client.train.rule_sparse import sparse_applies, sparse_safe_vocab
from torch import Tensor

from ._rows import Row

_EMPTY = np.zeros(0, dtype=np.int32)  # the row of a whole-vocabulary set


@dataclass
class StepOutput:
    """What one rule step produced for a batch (numpy, on the host).

    Attributes:
        tokens: int64 ``(B,)`` sampled from pi_S.
        logprobs: float32 ``(B,)`` log p(y), full tempered distribution.
        masked: float32 ``(B,)`` log pi_S(y).
        logmass: float32 ``(B,)`` log Z_S.
        sizes: int64 ``(B,)`` |S|.
        safe_ids: per row, int32 ids of S (ascending; empty when S is the whole
            vocabulary) or None when not asked.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    masked: np.ndarray
    logmass: np.ndarray
    sizes: np.ndarray
    safe_ids: list[np.ndarray | None]


@dataclass
class BatchRule:
    """The rule parameters of a batch's rows, built once per row list (not per step).

    Attributes:
        rows: the row list these were built from (compared by identity).
        params: validated per-row float32 parameters ``(B,)`` (``RuleParams``).
        sparse: every row samples with min-p alone: the sparse path applies.
        asked: per row, whether it wants the ids of S.
        generators: per row, its own generator.
    """

    rows: Sequence[Row]
    params: RuleParams
    sparse: bool
    asked: list[bool]
    generators: list[torch.Generator]

    @classmethod
    def of(cls, rows: Sequence[Row]) -> BatchRule:
        """Gather and validate the rows' parameters."""
        ps = [r.params for r in rows]
        temperature = torch.tensor([p.temperature for p in ps], dtype=torch.float64)
        min_p = torch.tensor([p.rule.min_p for p in ps], dtype=torch.float64)
        top_k = torch.tensor([p.rule.top_k or 0 for p in ps], dtype=torch.int64)
        top_p = torch.tensor([p.rule.top_p for p in ps], dtype=torch.float64)
        params = RuleParams.make(
            len(ps), temperature=temperature, min_p=min_p, top_k=top_k, top_p=top_p
        )
        return cls(
            rows=rows,
            params=params,
            sparse=sparse_applies(temperature, min_p, top_k, top_p),
            asked=[p.return_safe_token_ids for p in ps],
            generators=[r.generator for r in rows],
        )


def rule_step(logits: Tensor, rows: Sequence[Row], rule: BatchRule | None = None) -> StepOutput:
    """Apply the shared rule to last-position logits ``(B, V)`` and sample one token per row.

    Per-row temperature / min_p / top_k / top_p; each row draws from its own
    generator (inverse CDF over pi_S, see ``SafeVocab.sample``), so its token does
    not depend on its batch mates. Safe ids are extracted only for rows that asked.
    A batch whose rows all sample with min-p alone (the RL case) takes the sparse
    path (``dvp_client.train.rule_sparse``: the same sets and draws, S as id lists).
    ``rule``: the rows' :class:`BatchRule` when the caller keeps one (built if None).
    """
    if rule is None or rule.rows is not rows:
        rule = BatchRule.of(rows)
    if rule.sparse:
        sparse = sparse_safe_vocab(logits, params=rule.params)
        tokens = sparse.sample(rule.generators)
        full, masked = sparse.logprobs(tokens)
        logmass, sizes = sparse.safe_logmass, sparse.safe_sizes.numpy()
        safe_ids = _split_ids(sparse.ids, sizes, rule.asked)
    else:
        p = rule.params
        sv = safe_vocab(
            logits, temperature=p.temperature, min_p=p.min_p, top_k=p.top_k, top_p=p.top_p
        )
        tokens = sv.sample(rule.generators)  # (B,) int64
        full, masked = sv.logprobs(tokens)
        logmass, sizes = sv.safe_logmass, sv.safe_sizes.numpy()
        safe_ids = _safe_ids(sv.mask, sizes, rule.asked)
    vocab = logits.shape[-1]  # a whole-vocabulary set travels as an empty row (the marker)
    safe_ids = [
        None if ids is None else _EMPTY if s == vocab else ids
        for ids, s in zip(safe_ids, sizes, strict=True)
    ]
    return StepOutput(
        tokens=tokens.numpy(),
        logprobs=full.numpy(),
        masked=masked.numpy(),
        logmass=logmass.numpy(),
        sizes=sizes,
        safe_ids=safe_ids,
    )


def _split_ids(ids: Tensor, sizes: np.ndarray, asked: list[bool]) -> list[np.ndarray | None]:
    """Per row, int32 ids of S for the rows that asked, from the sparse path's id list.

    Args:
        ids: int64 ``(M,)``, every row's S one after the other; sizes: ``(B,)``.
    """
    if not any(asked):
        return [None] * len(asked)
    parts = np.split(ids.to(torch.int32).numpy(), np.cumsum(sizes)[:-1])
    return [part if a else None for part, a in zip(parts, asked, strict=True)]


def _safe_ids(mask: Tensor, sizes: np.ndarray, asked: list[bool]) -> list[np.ndarray | None]:
    """Ascending int32 ids of S for the rows that asked (one ``nonzero`` for all of them).

    Args:
        mask: bool ``(B, V)``; sizes: int64 ``(B,)`` row sums of ``mask``; asked: ``(B,)``.
    """
    out: list[np.ndarray | None] = [None] * len(asked)
    rows = [i for i, a in enumerate(asked) if a]
    if not rows:
        return out
    sub = mask if len(rows) == len(asked) else mask[rows]
    cols = sub.nonzero()[:, 1].to(torch.int32).numpy()  # row-major: grouped by row, ascending
    for i, part in zip(rows, np.split(cols, np.cumsum(sizes[rows])[:-1]), strict=True):
        out[i] = part
    return out
