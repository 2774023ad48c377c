"""Shared prompt prefixes for the torch engine's prefill: computed once, reused.

Rollouts prefilled together often start with the same tokens: the n samples of
one prompt (all of it), or every prompt of a chat template (its system prompt).
A prefill then runs the common prefix once, as a batch of one, and the rows'
own suffixes as a left-padded batch on top of it (``DecodeBatch.prefill``); the
prefix's keys / values are kept in a small LRU (:class:`PrefixCache`) so the
next group that shares it (a later merge into the running batch) skips it too.

The cache layout of such a batch is ``[prefix | padding | suffix]`` per row
instead of ``[padding | prompt]``: the same width (the longest prompt), the same
positions (the prefix at 0..P-1, the suffix after it), padding masked out. A
row's logits agree with an unshared prefill to float rounding (the prefix is a
batch-of-one forward): tested against float64 in tests/test_prefix_sharing.py.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor

#: Shorter common prefixes are prefilled with the rest (an extra forward costs more).
MIN_SHARED = 8

LayerKV = list[tuple[Tensor, Tensor]]  # per layer: keys, values (1, H, P, D)


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of ``prompts``, leaving every prompt at least
    one token of its own (its last token's logits start the rollout)."""
    first = prompts[0]
    limit = min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


class PrefixCache:
    """LRU of prefix keys / values by token ids, bounded in cached positions.

    Must be cleared when the weights change (the engine does it in its weight swap).
    Thread-safe (the scheduler thread reads and writes; a weight swap clears).
    """

    def __init__(self, max_positions: int = 2048) -> None:
        self.max_positions = max_positions
        self._entries: OrderedDict[tuple[int, ...], LayerKV] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[int, ...]) -> LayerKV | None:
        """The cached keys / values of prefix ``key``, or None (counted as a miss)."""
        with self._lock:
            kv = self._entries.get(key)
            if kv is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return kv

    def put(self, key: tuple[int, ...], kv: LayerKV) -> None:
        """Keep ``kv`` for ``key``; evict the least recently used past the bound."""
        if len(key) > self.max_positions:
            return
        with self._lock:
            self._entries[key] = kv
            self._entries.move_to_end(key)
            while sum(len(k) for k in self._entries) > self.max_positions:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every prefix (after a weight update)."""
        with self._lock:
            self._entries.clear()

    @property
    def positions(self) -> int:
        """Cached positions (for the KV accounting)."""
        with self._lock:
            return sum(len(k) for k in self._entries)
