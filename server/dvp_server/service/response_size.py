"""The worst-case size of a rollout response, computed before anything is decoded.

A request's response grows with its rollouts x ``max_tokens`` x the bytes of one
step, and a step's safe set can hold up to V - 1 ids (a min-p set at a flat
step; a whole-vocabulary set is a marker): one valid request could otherwise ask
for tens of GB. :func:`check_response_size` refuses, with a 422 naming the field,
a request whose worst case is over ``--max-response-bytes``, before any rollout
starts, so the server never builds it.

The bound is computed for JSON (``model_dump_json``), which is never smaller than
the msgpack of the same response (an id takes at most 5 bytes in msgpack and at
least its digits plus a comma in JSON; a float32 5 bytes against up to 25; bytes
raw against base64), and it holds for streams too (each chunk line's own keys are
counted per step). Per rollout with a prompt of L tokens and at most M new ones:

    L * (digits(V) + 1)                                 prompt_token_ids
    + M * (ids + 3 floats + size + outside-flag + text)   the per-step columns
    + M * set                                           safe sets, when asked
    + ROLLOUT_BYTES (keys, reasons, seed) + stop strings

where a float is at most 25 characters (``-2.2250738585072014e-308,``), the text
of one token at most 6 x the longest token's UTF-8 bytes (JSON escapes a control
byte as ``\\u00XX``), and ``set`` per step is, with ``n_max`` the largest listed
set (V - 1 when the rule can prune, ``top_k`` when it caps, 1 when greedy, 0 when
nothing is pruned: every set is then the marker): ``n_max * (digits(V) + 1)``
plus an offset (``"list"``), or 4/3 x ``safe_ids.max_step_bytes(n_max, V)``
(``"packed"``, base64). A ``top_k`` set is counted as k ids: ties at the k-th
value, which the rule keeps, are not bounded here.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dvp_client.safe_ids import max_step_bytes
from dvp_client.train.rule import GREEDY_EPS
from dvp_schemas import RolloutRequest

from ..errors import validation_error

__all__ = ["ResponseBound", "check_response_size", "response_bound", "token_bytes"]

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
) -> None:
    """Refuse a request whose worst-case response is over ``limit`` bytes.

    Raises:
        ServiceError: 422 naming ``return_safe_token_ids`` when the safe sets put it
            over (and it fits without them), else ``sampling.max_tokens``.
    """
    bound = response_bound(request, rollouts, vocab_size=vocab_size, token_bytes=token_bytes)
    if bound.total <= limit:
        return
    steps = sum(m for _, m in rollouts)
    where = f"{len(rollouts)} rollouts x up to {request.sampling.max_tokens} tokens ({steps} steps)"
    if bound.sets and bound.total - bound.sets <= limit:
        hint = (
            ' (send safe_token_ids_format "packed": at most ~V/8 bytes per step)'
            if request.safe_token_ids_format == "list"
            else ""
        )
        raise validation_error(
            "return_safe_token_ids",
            f"the response could reach {bound.total} bytes, over the server limit of {limit} "
            f"(--max-response-bytes): {where}, each step's safe set up to "
            f"{largest_listed_set(request, vocab_size)} ids of a vocabulary of {vocab_size}"
            f"{hint}; ask for fewer rollouts or tokens, or a rule with top_k",
        )
    raise validation_error(
        "sampling.max_tokens",
        f"the response could reach {bound.total} bytes, over the server limit of {limit} "
        f"(--max-response-bytes): {where}; ask for fewer rollouts or tokens",
    )
