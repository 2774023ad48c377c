"""The size of a rollout response: bounded before it runs, its sets counted as produced.

A request's response grows with its rollouts x ``max_tokens`` x the bytes of one
step, and a step's safe set can hold up to V - 1 ids (a min-p set at a flat
step; a whole-vocabulary set is a marker). Two guards keep every response under
``--max-response-bytes`` without refusing realistic batches:

1. before any rollout starts, :func:`check_response_size` bounds everything but
   the safe sets (ids, floats, text, prompts: what the request fixes) and
   refuses a request whose bound alone is over the limit (422 naming
   ``sampling.max_tokens``);
2. while the rollouts run, a :class:`SetBudget` counts the bytes their safe sets
   actually take (each chunk's sets as the engine hands them over) against what
   the limit leaves; a request whose real sets pass it is stopped at once, its
   rollouts aborted, with a 422 naming ``return_safe_token_ids`` and the packed
   format. So a modest GRPO batch (16 prompts x n = 4 x 64 tokens of SmolLM2 at
   min_p 1e-3: mean |S| about 150, a few MB) gets its id lists at the defaults,
   and a hostile one (sets near V at every step) still stops at the limit: the
   server never holds more than about the limit of sets.

The bound is computed for JSON (``model_dump_json``), which is never smaller than
the msgpack of the same response (an id takes at most 5 bytes in msgpack and at
least its digits plus a comma in JSON; a float32 5 bytes against up to 25; bytes
raw against base64), and it holds for streams too (each chunk line's own keys are
counted per step). Per rollout with a prompt of L tokens and at most M new ones:

    L * (digits(V) + 1)                                 prompt_token_ids
    + M * (ids + 3 floats + size + outside-flag + text)   the per-step columns
    + ROLLOUT_BYTES (keys, reasons, seed) + stop strings

where a float is at most 25 characters (``-2.2250738585072014e-308,``) and the
text of one token at most 6 x the longest token's UTF-8 bytes (JSON escapes a
control byte as ``\\u00XX``). A produced step's set of n < V ids counts
``n * (digits(V) + 1)`` plus an offset (``"list"``), or 4/3 x
``safe_ids.max_step_bytes(n, V)`` (``"packed"``, base64); a whole-vocabulary set
counts an offset (it is a marker). :func:`response_bound` also gives the worst
case of the sets (``n_max`` ids per step: V - 1 when the rule can prune,
``top_k`` when it caps, 1 when greedy, 0 when nothing is pruned).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from dvp_client.safe_ids import max_step_bytes
from dvp_client.train.rule import GREEDY_EPS
from dvp_schemas import RolloutRequest

from ..engines.base import RolloutChunk
from ..errors import validation_error

__all__ = [
    "ResponseBound",
    "SetBudget",
    "check_response_size",
    "response_bound",
    "token_bytes",
]

FLOAT_BYTES = 25  # the longest float repr plus a comma
ROLLOUT_BYTES = 1024  # keys, indices, finish / stop reason, policy version, seed, text quotes
STREAM_STEP_BYTES = 512  # a stream chunk line's keys and framing, counted once per step
OFFSET_BYTES = 12  # one CSR offset ("list"): up to 11 digits and a comma


@dataclass(frozen=True)
class ResponseBound:
    """The worst case of one request, in bytes: ``total`` and the part the safe sets take."""

    total: int
    sets: int


_TOKEN_BYTES: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def token_bytes(tokenizer: Any) -> int:
    """The most UTF-8 bytes one token decodes to: its longest vocabulary entry's written
    form (byte-level BPE writes a byte as one or two bytes of UTF-8, SentencePiece a
    space as three). Computed once per tokenizer."""
    if tokenizer is None:
        return 0
    if (known := _TOKEN_BYTES.get(tokenizer)) is None:
        vocab = tokenizer.get_vocab()
        known = max((len(str(t).encode("utf-8", "replace")) for t in vocab), default=1)
        _TOKEN_BYTES[tokenizer] = known
    return known


def _digits(n: int) -> int:
    return len(str(max(n, 0)))


def largest_listed_set(request: RolloutRequest, vocab_size: int) -> int:
    """The most ids one step's set can list (a whole-vocabulary set lists none)."""
    rule = request.pruning
    if request.sampling.temperature < GREEDY_EPS:
        return 1  # greedy: S = {argmax}
    if not rule.prunes:
        return 0  # every set is the whole vocabulary: the marker
    if rule.min_p == 0.0 and rule.top_p == 1.0 and rule.top_k is not None:
        return min(rule.top_k, vocab_size - 1)
    return vocab_size - 1


def response_bound(
    request: RolloutRequest,
    rollouts: Sequence[tuple[int, int]],
    *,
    vocab_size: int,
    token_bytes: int,
) -> ResponseBound:
    """The worst-case JSON size of the request's response (see the module docstring).

    Args:
        request: the checked request (its format, rule, temperature, stream flag).
        rollouts: per rollout, ``(prompt tokens, max new tokens)``.
        vocab_size: V.
        token_bytes: the most UTF-8 bytes one token decodes to.
    """
    id_bytes = _digits(vocab_size) + 1
    step = 2 * id_bytes + 3 * FLOAT_BYTES + _digits(request.sampling.max_tokens) + 1
    if request.return_text:
        step += 6 * token_bytes
    if request.stream:
        step += STREAM_STEP_BYTES
    listed = largest_listed_set(request, vocab_size)
    stops = 6 * sum(len(s.encode()) for s in request.sampling.stop or ())
    total = sets = 0
    for prompt_len, max_tokens in rollouts:
        set_bytes = 0
        if request.return_safe_token_ids:
            if request.safe_token_ids_format == "packed":
                raw = max_tokens * max_step_bytes(listed, vocab_size) if listed else 0
                set_bytes = 4 * (-(-raw // 3)) + 2  # base64 and its quotes
            else:
                set_bytes = max_tokens * (listed * id_bytes + OFFSET_BYTES)
        sets += set_bytes
        total += ROLLOUT_BYTES + stops + prompt_len * id_bytes + max_tokens * step + set_bytes
    return ResponseBound(total=total, sets=sets)


def check_response_size(
    request: RolloutRequest,
    rollouts: Sequence[tuple[int, int]],
    *,
    vocab_size: int,
    token_bytes: int,
    limit: int,
) -> SetBudget | None:
    """Refuse a request whose response is over ``limit`` bytes without its safe sets.

    Returns:
        The :class:`SetBudget` its sets must stay within (None: it asks for no sets).

    Raises:
        ServiceError: 422 naming ``sampling.max_tokens``.
    """
    bound = response_bound(request, rollouts, vocab_size=vocab_size, token_bytes=token_bytes)
    fixed = bound.total - bound.sets
    if fixed > limit:
        steps = sum(m for _, m in rollouts)
        raise validation_error(
            "sampling.max_tokens",
            f"the response could reach {fixed} bytes without its safe sets, over the server "
            f"limit of {limit} (--max-response-bytes): {len(rollouts)} rollouts x up to "
            f"{request.sampling.max_tokens} tokens ({steps} steps); ask for fewer rollouts "
            "or tokens",
        )
    if not request.return_safe_token_ids or bound.sets == 0:
        return None
    return SetBudget(request, vocab_size, budget=limit - fixed, limit=limit)


class SetBudget:
    """The bytes one request's safe sets may take, counted as the engine produces them.

    Args:
        request: the request (its format).
        vocab_size: V.
        budget: bytes the sets may take (the limit less everything else's bound).
        limit: ``--max-response-bytes`` (named in the error).
    """

    def __init__(self, request: RolloutRequest, vocab_size: int, budget: int, limit: int) -> None:
        self.packed = request.safe_token_ids_format == "packed"
        self.vocab_size = vocab_size
        self.budget = budget
        self.limit = limit
        self.used = 0
        self.steps = 0
        self.ids = 0
        self._id_bytes = _digits(vocab_size) + 1

    def add(self, chunk: RolloutChunk) -> None:
        """Count one chunk's sets.

        Raises:
            ServiceError: 422 naming ``return_safe_token_ids`` once the sets pass the
                budget (the caller aborts the request's rollouts).
        """
        sizes = chunk.safe_sizes
        listed = sizes[sizes < self.vocab_size].astype(np.int64)  # V: the marker, no ids
        if self.packed:
            raw = sum(max_step_bytes(int(n), self.vocab_size) for n in listed)
            used = 4 * math.ceil(raw / 3) + OFFSET_BYTES * len(sizes)
        else:
            used = int(listed.sum()) * self._id_bytes + OFFSET_BYTES * len(sizes)
        self.used += used
        self.steps += len(sizes)
        self.ids += int(listed.sum())
        if self.used > self.budget:
            raise self._over()

    def _over(self) -> Exception:
        mean = self.ids / max(self.steps, 1)
        fmt = "packed" if self.packed else "list"
        hint = (
            '; send safe_token_ids_format "packed" (a bitmap or varints: at most '
            f"~{-(-self.vocab_size // 8)} bytes per step)"
            if not self.packed
            else ""
        )
        return validation_error(
            "return_safe_token_ids",
            f"the safe sets of this response reached {self.used} bytes ({fmt} format) after "
            f"{self.steps} steps, mean {mean:.0f} ids per step of a vocabulary of "
            f"{self.vocab_size}: over what the server limit of {self.limit} bytes "
            f"(--max-response-bytes) leaves for them ({self.budget}){hint}; or ask for "
            "fewer rollouts or tokens, or a rule that prunes more (a larger min_p, top_k)",
        )
