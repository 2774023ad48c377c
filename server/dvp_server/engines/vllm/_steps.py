"""Per-step DVP metadata from vLLM's raw top-K log-probs, with OUR rule.

vLLM (``logprobs_mode="raw_logprobs"``, ``flat_logprobs=True``) returns, per
generated position, K + 1 rows: row 0 is the sampled token y with its raw
log-prob, rows 1..K the top-K tokens by raw log-prob (y again if it is among
them). Raw log-probs are ``log_softmax(z)`` at T = 1, before temperature and
filters. From them, per step t:

- the rule (:func:`dvp_client.train.rule.safe_vocab`, the one shared implementation)
  applied to the K values ``r_1..r_K`` as logits with the request's T, min_p,
  top_k and top_p. ``r / T = z / T - log Z / T`` differs from the scaled logits
  by a per-row constant, which min_p (relative to the max), top_k (an order)
  and top_p (renormalised) do not see; so S is exact whenever S lies inside the
  top-K, which ``top_k <= K`` guarantees (ties at the K-th value aside);
- ``masked = r_y / T - logsumexp_{v in S} r_v / T`` (exact at any T);
- ``logprob = r_y`` and ``safe_logmass = logsumexp_{v in S} r_v`` only at T = 1
  (and greedy T = 0, whose log-probs are reported at T = 1, as the torch engine
  does); NaN otherwise: the full normaliser at T != 1 needs all V logits.

A step whose sampled token is not in the derived S (vLLM's sampler and our
rule disagree at a threshold, in float32) is flagged in ``outside``; its S is
then the derived set plus y, so every invariant (y in S, masked = full -
logmass) still holds and the trainer can drop or mask the step. Nothing is
hidden: the serving layer reports the flagged steps per rollout.

All of it is one batched ``safe_vocab`` call per chunk of steps, on ``(t, K)``
tensors; the only Python loop is none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from dvp_client.train.rule import GREEDY_EPS, safe_vocab
from dvp_schemas import PruningRule

__all__ = ["DerivedSteps", "StepBuffer", "TopK", "derive_steps", "read_flat_topk"]

_SENTINEL = np.iinfo(np.int64).max  # sorts after every token id


@dataclass(frozen=True)
class TopK:
    """Raw top-K log-probs of t consecutive steps.

    Attributes:
        sampled: int64 ``(t,)`` sampled token ids y.
        sampled_lp: float32 ``(t,)`` raw ``log p(y)`` at T = 1.
        ids: int64 ``(t, K)`` top-K token ids.
        lps: float32 ``(t, K)`` their raw log-probs.
    """

    sampled: np.ndarray
    sampled_lp: np.ndarray
    ids: np.ndarray
    lps: np.ndarray


def read_flat_topk(flat: Any, start: int, stop: int, k: int) -> TopK:
    """Columns of positions ``[start, stop)`` of a vLLM ``FlatLogprobs``.

    Each position holds row 0 (the sampled token) and then its top-K rows; a
    position built by vLLM's ``append_fast`` has exactly K + 1 rows, one merged
    through a dict (DELTA aggregation) has K when y is in the top-K. Both are
    read the same way: row 0 is y, the last K rows are the top-K set. The engine
    asks for DELTA outputs, so merging happens only when its reader falls a whole
    output behind vLLM.

    Args:
        flat: a ``vllm.logprobs.FlatLogprobs`` (``start_indices``, ``end_indices``,
            ``token_ids``, ``logprobs`` lists).
        start, stop: position range, ``0 <= start <= stop <= len(flat)``.
        k: K, the log-probs asked for per step.

    Raises:
        ValueError: a position has fewer than K rows (not what was asked for).
    """
    t = stop - start
    if t <= 0:
        empty_f = np.zeros((0, k), dtype=np.float32)
        return TopK(
            np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, k), np.int64), empty_f
        )
    lo, hi = flat.start_indices[start], flat.end_indices[stop - 1]
    starts = np.asarray(flat.start_indices[start:stop], dtype=np.int64) - lo  # (t,)
    ends = np.asarray(flat.end_indices[start:stop], dtype=np.int64) - lo  # (t,)
    if int((ends - starts).min()) < k:
        raise ValueError(f"vLLM returned fewer than K={k} log-probs at a step")
    ids = np.asarray(flat.token_ids[lo:hi], dtype=np.int64)
    lps = np.asarray(flat.logprobs[lo:hi], dtype=np.float32)
    cols = ends[:, None] - k + np.arange(k)  # (t, K): the last K rows of each position
    return TopK(sampled=ids[starts], sampled_lp=lps[starts], ids=ids[cols], lps=lps[cols])


class StepBuffer:
    """Steps received from vLLM (DELTA outputs) and not yet turned into a chunk.

    vLLM sends a rollout's first token at once and then every ``stream_interval``
    tokens (and at the end), each output holding only its new steps. The buffer
    joins those pieces and hands them out ``n`` steps at a time (:meth:`take`), so
    chunk boundaries do not depend on how vLLM cut its outputs.
    """

    def __init__(self) -> None:
        self._tokens: list[np.ndarray] = []
        self._tops: list[TopK] = []
        self.size = 0  # buffered steps

    def add(self, tokens: np.ndarray, top: TopK) -> None:
        """Append t steps: int64 ``tokens`` ``(t,)`` and their top-K (``t`` rows)."""
        if len(tokens):
            self._tokens.append(tokens)
            self._tops.append(top)
            self.size += len(tokens)

    def take(self, n: int) -> tuple[np.ndarray, TopK]:
        """The first ``min(n, size)`` buffered steps (tokens, top-K), removed.

        Raises:
            ValueError: the buffer is empty.
        """
        if not self._tops:
            raise ValueError("no buffered steps")
        if len(self._tops) == 1:
            tokens, top = self._tokens[0], self._tops[0]
        else:
            tokens = np.concatenate(self._tokens)
            top = TopK(*(np.concatenate([getattr(t, f) for t in self._tops]) for f in _TOPK_FIELDS))
        self._tokens, self._tops, self.size = [], [], 0
        if n < len(tokens):
            self.add(tokens[n:], _rows(top, slice(n, None)))
            return tokens[:n], _rows(top, slice(0, n))
        return tokens, top

    def ready(self, n: int, finished: bool) -> list[tuple[np.ndarray, TopK]]:
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


_TOPK_FIELDS = ("sampled", "sampled_lp", "ids", "lps")


def _rows(top: TopK, rows: slice) -> TopK:
    return TopK(*(getattr(top, f)[rows] for f in _TOPK_FIELDS))


@dataclass(frozen=True)
class DerivedSteps:
    """What the wire contract asks for, for t steps (see the module docstring).

    Attributes:
        logprobs: float32 ``(t,)``; NaN unless T = 1 or greedy (T < 1e-5).
        masked: float32 ``(t,)`` ``log pi_S(y)``.
        logmass: float32 ``(t,)`` ``log Z_S``; NaN unless T = 1 or greedy (T < 1e-5).
        sizes: int64 ``(t,)`` ``|S|``.
        outside: bool ``(t,)``: y was not in the derived set (S then includes it).
        safe_ids: int32 flat sorted ids of every S (CSR), or None.
        safe_offsets: int64 ``(t + 1,)`` CSR offsets, or None.
    """

    logprobs: np.ndarray
    masked: np.ndarray
    logmass: np.ndarray
    sizes: np.ndarray
    outside: np.ndarray
    safe_ids: np.ndarray | None
    safe_offsets: np.ndarray | None


def derive_steps(top: TopK, temperature: float, rule: PruningRule, with_ids: bool) -> DerivedSteps:
    """Apply the rule to the top-K raw log-probs of t steps (one batched call).

    Args:
        top: the steps' raw top-K (:func:`read_flat_topk`).
        temperature: T of the rollout (below ``GREEDY_EPS`` = 1e-5: greedy, as vLLM).
        rule: the effective rule (``top_k <= K``).
        with_ids: also build the CSR ids of every S.

    Returns:
        The per-step arrays; see :class:`DerivedSteps`.
    """
    t = top.lps.shape[0]
    lps = torch.from_numpy(top.lps)  # (t, K) float32
    sv = safe_vocab(
        lps, temperature=temperature, min_p=rule.min_p, top_k=rule.top_k, top_p=rule.top_p
    )
    greedy = temperature < GREEDY_EPS  # the rule's and vLLM's greedy cut
    scale = 1.0 if greedy else 1.0 / temperature  # greedy: reported at T = 1
    mask = sv.mask.numpy()  # (t, K) bool
    y = top.sampled
    y_col = top.ids == y[:, None]  # (t, K): where y sits in the top-K, if it does
    in_s = (mask & y_col).any(axis=1)  # (t,)
    outside = ~in_s
    u_y = torch.from_numpy(top.sampled_lp) * scale  # (t,) y's scaled raw log-prob
    log_z_safe = sv.log_z_safe  # (t,) logsumexp_S r / T
    out_t = torch.from_numpy(outside)
    # A flagged step's S is the derived set plus y: add y's mass to the normaliser.
    log_z_safe = torch.where(out_t, torch.logaddexp(log_z_safe, u_y), log_z_safe)
    masked = (u_y - log_z_safe).numpy().astype(np.float32)
    exact = greedy or temperature == 1.0
    nan = np.full(t, math.nan, dtype=np.float32)
    logprobs = top.sampled_lp.astype(np.float32) if exact else nan
    logmass = log_z_safe.numpy().astype(np.float32) if exact else nan.copy()
    sizes = mask.sum(axis=1).astype(np.int64) + outside
    safe_ids = offsets = None
    if with_ids:
        safe_ids, offsets = _csr(top, mask | (y_col & outside[:, None]), outside, y_col)
    return DerivedSteps(logprobs, masked, logmass, sizes, outside, safe_ids, offsets)


def _csr(
    top: TopK, mask: np.ndarray, outside: np.ndarray, y_col: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ids of each step's S in CSR form: ``(ids int32, offsets int64 (t + 1,))``.

    ``mask`` ``(t, K)`` already marks y where it is a flagged top-K token; a flagged
    y outside the top-K gets an extra column.
    """
    extra = outside & ~y_col.any(axis=1)  # (t,) y below the top-K
    ids = np.concatenate([top.ids, top.sampled[:, None]], axis=1)  # (t, K + 1)
    keep = np.concatenate([mask, extra[:, None]], axis=1)  # (t, K + 1)
    ordered = np.sort(np.where(keep, ids, _SENTINEL), axis=1)  # kept ids first, ascending
    flat = ordered[ordered != _SENTINEL].astype(np.int32)  # row-major: step by step
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(keep.sum(axis=1), out=offsets[1:])
    return flat, offsets
