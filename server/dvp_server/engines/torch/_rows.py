"""Per-rollout state of the torch engine: buffers, finish checks, stop strings.

A :class:`Row` lives from ``TorchEngine.generate`` until its last chunk is
delivered. The scheduler thread appends one step at a time to its buffers and
hands chunks to the asyncio side through :meth:`Row.emit`; nothing else touches
a row after submission, so rows need no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from dvp_schemas import FinishReason

from ..base import EngineParams, RolloutChunk


class StopStringMatcher:
    """Detokenises a rollout incrementally and finds the first stop string.

    Uses the prefix/read-offset scheme of vLLM's incremental detokenizer: each new
    token decodes only a short window ``ids[prefix:]`` and the text grows by the
    part beyond ``ids[prefix:read]``; a window that ends in an incomplete UTF-8
    sequence (U+FFFD) waits for the next token. Special tokens are skipped, as in
    the returned completion text.
    """

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]) -> None:
        self._tok = tokenizer
        self._stops = stops
        self._longest = max(len(s) for s in stops)
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self.text = ""

    def push(self, token_id: int) -> str | None:
        """Add one token; return the stop string now in the text (earliest first), if any."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return None
        delta = new_text[len(prefix_text) :]
        self.text += delta
        self._prefix, self._read = self._read, len(self._ids)
        # A match must end inside the new delta; start where it could begin.
        start = max(0, len(self.text) - len(delta) - self._longest + 1)
        best: tuple[int, str] | None = None
        for s in self._stops:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return None if best is None else best[1]

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return str(self._tok.decode(ids, skip_special_tokens=True))


@dataclass(eq=False)  # identity: rows live in sets and deques
class Row:
    """One rollout in the engine: its request, generator, buffers and delivery target.

    Buffers hold the steps decoded since the last emitted chunk.
    """

    request_id: str
    prompt: list[int]
    params: EngineParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RolloutChunk]
    eos_ids: frozenset[int]
    stop_matcher: StopStringMatcher | None
    generator: torch.Generator = field(init=False)
    num_generated: int = 0
    done: bool = False
    #: the version of the weights the row's keys / values were last prefilled with
    kv_version: int = 0
    #: every token generated so far (a recompute prefills prompt + these again)
    generated: list[int] = field(default_factory=list)
    _pv: list[int] = field(default_factory=list)
    _kv: list[int] = field(default_factory=list)
    _tokens: list[int] = field(default_factory=list)
    _logprobs: list[float] = field(default_factory=list)
    _masked: list[float] = field(default_factory=list)
    _logmass: list[float] = field(default_factory=list)
    _sizes: list[int] = field(default_factory=list)
    _safe_ids: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        # One generator per rollout: its draws do not depend on its batch mates.
        self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def pending_steps(self) -> int:
        """Steps buffered since the last chunk."""
        return len(self._tokens)

    def record(
        self,
        token: int,
        logprob: float,
        masked: float,
        logmass: float,
        size: int,
        safe_ids: np.ndarray | None,
        version: int = 0,
    ) -> None:
        """Append one decoded step to the buffers; ``version``: the weights that sampled it."""
        self._tokens.append(token)
        self.generated.append(token)
        self._pv.append(version)
        self._kv.append(self.kv_version)
        self._logprobs.append(logprob)
        self._masked.append(masked)
        self._logmass.append(logmass)
        self._sizes.append(size)
        if safe_ids is not None:
            self._safe_ids.append(safe_ids)
        self.num_generated += 1

    def finish_check(
        self, token: int, max_model_len: int
    ) -> tuple[FinishReason, str | int | None] | None:
        """Why the rollout ends after ``token`` (just recorded), or None to go on.

        Order as vLLM: eos (unless ignore_eos), stop token ids, stop strings,
        max_tokens, then the model's context length.
        """
        p = self.params
        if not p.ignore_eos and token in self.eos_ids:
            return "stop", None
        if token in p.stop_token_ids:
            return "stop", token
        if self.stop_matcher is not None:
            hit = self.stop_matcher.push(token)
            if hit is not None:
                return "stop", hit
        if self.num_generated >= p.max_tokens:
            return "length", None
        if len(self.prompt) + self.num_generated >= max_model_len:
            return "length", None
        return None

    def take_chunk(
        self,
        finish_reason: FinishReason | None = None,
        stop_reason: str | int | None = None,
        error: str | None = None,
        policy_version: int = 0,
    ) -> RolloutChunk:
        """Build a chunk from the buffers and clear them."""
        safe_ids = safe_offsets = None
        if self.params.return_safe_token_ids:
            sizes = np.fromiter((a.size for a in self._safe_ids), dtype=np.int64)
            safe_offsets = np.zeros(len(self._safe_ids) + 1, dtype=np.int64)
            np.cumsum(sizes, out=safe_offsets[1:])
            safe_ids = (
                np.concatenate(self._safe_ids).astype(np.int32, copy=False)
                if self._safe_ids
                else np.zeros(0, dtype=np.int32)
            )
        chunk = RolloutChunk(
            token_ids=np.asarray(self._tokens, dtype=np.int64),
            logprobs=np.asarray(self._logprobs, dtype=np.float32),
            masked_logprobs=np.asarray(self._masked, dtype=np.float32),
            safe_logmass=np.asarray(self._logmass, dtype=np.float32),
            safe_sizes=np.asarray(self._sizes, dtype=np.int64),
            safe_ids=safe_ids,
            safe_offsets=safe_offsets,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            policy_version=self._pv[0] if self._pv else policy_version,
            error=error,
            policy_versions=np.asarray(self._pv, dtype=np.int64),
            kv_versions=np.asarray(self._kv, dtype=np.int64),
        )
        bufs = (self._tokens, self._logprobs, self._masked, self._logmass, self._sizes)
        for buf in (*bufs, self._pv, self._kv):
            buf.clear()
        self._safe_ids.clear()
        return chunk

    def emit(self, chunk: RolloutChunk) -> None:
        """Hand a chunk to the rollout's asyncio queue (thread-safe); marks the row done
        when the chunk is the last one. A closed event loop drops the chunk."""
        if chunk.finish_reason is not None:
            self.done = True
        # A closed event loop raises RuntimeError: nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, chunk)
