"""One batch of rollouts decoded together by the torch engine: KV cache and rule step.

Shapes: B rows, K cached positions (left-padded), V vocabulary.

The batch is left-padded: row i's prompt sits at the right end of the first K
columns, its ``attention_mask`` row is 0 over the padding, and its positions
count real tokens only (``position_ids = attention_mask.cumsum(-1) - 1``, as
``generate()`` builds them), so a row's logits do not depend on how much padding
its batch mates force on it (up to float rounding).

Finished rows leave through :meth:`DecodeBatch.keep`, which selects the
surviving rows of the cache, so they cost nothing afterwards; leading columns
that became padding for every survivor are cut. Rows join a running batch
(continuous batching) through :meth:`DecodeBatch.merge`: the newcomers are
prefilled as their own left-padded batch, then both caches are left-padded to
the same K along the sequence axis and concatenated along the batch axis (keys
and values ``(B, H, K, D)`` per layer, the mask ``(B, K)``, next positions
``(B,)``). Every row's real tokens stay at the right end of the cache (rows
prefilled with a shared prefix hold ``[prefix | padding | suffix]``, ``_prefix.py``:
the same width), so after a trim ``K = max_i (prompt_i + generated_i)``: a batch's
cache never holds more than ``B * max_i (prompt_i + max_tokens_i)`` positions.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ._prefix import MIN_SHARED, PrefixCache, common_prefix
from ._rows import Row
from ._rule_step import BatchRule


class SlackLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys / values are views of buffers with room to grow.

    ``DynamicLayer.update`` concatenates: every decode step copies the whole cache
    of every layer (``B * H * K * D`` per tensor). Here the keys / values
    ``(B, H, K, D)`` are the first K positions of buffers ``(B, H, K + slack, D)``;
    a step writes its new position in place, and the buffers are reallocated (one
    copy) only when full or after someone replaced the tensors (``keep``, a trim,
    a merge: detected by identity). The cached values are the plain layer's; the
    attention over strided views may round differently (~1e-6 in log-probs).
    """

    SLACK = 64
    _kbuf: Tensor | None = None
    _vbuf: Tensor | None = None

    def __init__(self, slack: int = SLACK) -> None:
        super().__init__()
        self.slack = slack

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Append ``key_states`` / ``value_states`` ``(B, H, t, D)``; return the views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.keys, self.values
        assert keys is not None and values is not None
        n = keys.shape[-2] if keys.numel() else 0
        t = key_states.shape[-2]
        kbuf, vbuf = self._kbuf, self._vbuf
        if (
            kbuf is None
            or vbuf is None
            or n + t > kbuf.shape[-2]
            or keys.data_ptr() != kbuf.data_ptr()
            or values.data_ptr() != vbuf.data_ptr()
            or keys.shape[0] != kbuf.shape[0]
        ):
            kbuf = self._kbuf = self._grow(keys, key_states, n + t)
            vbuf = self._vbuf = self._grow(values, value_states, n + t)
        kbuf[:, :, n : n + t] = key_states
        vbuf[:, :, n : n + t] = value_states
        self.keys, self.values = kbuf[:, :, : n + t], vbuf[:, :, : n + t]
        return self.keys, self.values

    def _grow(self, old: Tensor, new: Tensor, need: int) -> Tensor:
        """A buffer for ``need + slack`` positions holding ``old``'s ``n`` positions."""
        b, h, _, d = new.shape
        buf = new.new_empty((b, h, need + self.slack, d))
        n = old.shape[-2] if old.numel() else 0
        if n:
            buf[:, :, :n] = old
        return buf

    @property
    def capacity(self) -> int:
        """Positions the buffers hold (0 before the first update)."""
        return 0 if self._kbuf is None else int(self._kbuf.shape[-2])


_PLAIN = (DynamicLayer, SlackLayer)


class DecodeBatch:
    """Rows decoding in lock-step over one shared (left-padded) KV cache.

    Attributes:
        rows: the B rows, in cache order.
        cache: transformers ``DynamicCache`` of K positions.
        attention_mask: int64 ``(B, K)``; 1 over real tokens.
        next_pos: int64 ``(B,)``, the position of each row's next token.
    """

    def __init__(self, model: Any, rows: list[Row], pad_id: int, slack: int = 0) -> None:
        self.model = model
        self.rows = rows
        self.pad_id = pad_id
        self.slack = slack
        self.cache = DynamicCache(config=model.config)
        if slack and all(type(layer) is DynamicLayer for layer in self.cache.layers):
            self.cache.layers = [SlackLayer(slack) for _ in self.cache.layers]
        self.attention_mask = torch.zeros(0, 0, dtype=torch.int64)
        self.next_pos = torch.zeros(0, dtype=torch.int64)
        self._rule: BatchRule | None = None
        self.prefilled = 0  # positions the last prefill ran through the model

    def rule(self) -> BatchRule:
        """The rows' :class:`BatchRule`, rebuilt only when the row list changed."""
        if self._rule is None or self._rule.rows is not self.rows:
            self._rule = BatchRule.of(self.rows)
        return self._rule

    def prefill(self, prefixes: PrefixCache | None = None) -> Tensor:
        """Run the left-padded prompts through the model; float logits ``(B, V)``.

        With ``prefixes`` (sharing on): rows with the same prompt (the n samples of
        a prompt) are prefilled once and their caches copied; and two or more
        prompts sharing at least ``MIN_SHARED`` leading tokens run that prefix once
        (or take it from the cache), then only their suffixes (``_prefix.py``).
        ``self.prefilled`` counts the positions that went through the model.
        """
        prompts = [r.prompt for r in self.rows]
        if prefixes is not None:
            first: dict[tuple[int, ...], int] = {}
            index = [first.setdefault(tuple(p), i) for i, p in enumerate(prompts)]
            if len(first) < len(prompts):
                return self._prefill_unique(sorted(first.values()), index, prefixes)
        plain = all(type(layer) in _PLAIN for layer in self.cache.layers)
        shared = common_prefix(prompts) if prefixes is not None and len(prompts) > 1 else 0
        if prefixes is not None and plain and shared >= MIN_SHARED:
            return self._prefill_shared(prompts, shared, prefixes)
        return self.prefill_contexts(prompts)

    def prefill_contexts(self, contexts: list[list[int]]) -> Tensor:
        """Run ``contexts`` (one per row, left-padded, no sharing) through the model into
        a fresh cache; float logits ``(B, V)`` of their last positions. A recompute
        passes each row's prompt + generated tokens but the last."""
        lens = [len(c) for c in contexts]
        b, k = len(self.rows), max(lens)
        self.prefilled = b * k
        ids = torch.full((b, k), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((b, k), dtype=torch.int64)
        for i, c in enumerate(contexts):
            ids[i, k - lens[i] :] = torch.tensor(c, dtype=torch.int64)
            mask[i, k - lens[i] :] = 1
        pos = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)  # (B, K), as generate()
        self.attention_mask = mask
        self.next_pos = pos[:, -1] + 1
        return self._forward(ids, pos)

    def _prefill_unique(self, unique: list[int], index: list[int], prefixes: PrefixCache) -> Tensor:
        """Prefill rows ``unique`` only, then give every row the cache of its prompt's.

        Args:
            unique: ascending row indices, one per distinct prompt.
            index: per row, the row in ``unique`` whose prompt it has.
        """
        sub = DecodeBatch(self.model, [self.rows[i] for i in unique], self.pad_id, self.slack)
        logits = sub.prefill(prefixes)  # (U, V)
        where = {row: j for j, row in enumerate(unique)}
        pick = torch.tensor([where[i] for i in index], dtype=torch.int64)  # (B,)
        self.cache = sub.cache
        self.cache.batch_select_indices(pick)  # (U, ...) -> (B, ...), a copy per row
        self.attention_mask = sub.attention_mask[pick]
        self.next_pos = sub.next_pos[pick]
        self.prefilled = sub.prefilled
        return logits[pick]

    def _prefill_shared(self, prompts: list[list[int]], p: int, prefixes: PrefixCache) -> Tensor:
        """Prefill rows whose first ``p`` tokens are equal: cache ``[prefix | pad | suffix]``.

        The prefix's keys / values ``(1, H, p, D)`` per layer (computed as a batch
        of one, or from ``prefixes``) are broadcast to the B rows; the suffixes run
        left-padded after them at positions ``p, p + 1, ...``. Logits ``(B, V)``.
        """
        key = tuple(prompts[0][:p])
        kv = prefixes.get(key)
        self.prefilled = 0
        if kv is None:
            one = DynamicCache(config=self.model.config)
            self.model(
                input_ids=torch.tensor([key], dtype=torch.int64),
                attention_mask=torch.ones((1, p), dtype=torch.int64),
                position_ids=torch.arange(p).unsqueeze(0),
                past_key_values=one,
                use_cache=True,
                logits_to_keep=1,
            )
            kv = []
            for layer in cast(list[DynamicLayer], one.layers):
                if layer.keys is None or layer.values is None:
                    raise ValueError("the prefix forward left a cache layer empty")
                kv.append((layer.keys, layer.values))
            prefixes.put(key, kv)
            self.prefilled = p
        b = len(prompts)
        for layer, (k_p, v_p) in zip(cast(list[DynamicLayer], self.cache.layers), kv, strict=True):
            layer.update(k_p.expand(b, -1, -1, -1), v_p.expand(b, -1, -1, -1))
        lens = [len(x) - p for x in prompts]
        s = max(lens)
        ids = torch.full((b, s), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((b, s), dtype=torch.int64)
        for i, x in enumerate(prompts):
            ids[i, s - lens[i] :] = torch.tensor(x[p:], dtype=torch.int64)
            mask[i, s - lens[i] :] = 1
        pos = (p + mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)  # (B, S)
        self.attention_mask = torch.cat([torch.ones((b, p), dtype=torch.int64), mask], dim=-1)
        self.next_pos = pos[:, -1] + 1
        self.prefilled += b * s
        return self._forward(ids, pos)

    def decode(self, tokens: np.ndarray) -> Tensor:
        """Feed each row's last sampled token (int64 ``(B,)``); logits ``(B, V)``."""
        ids = torch.from_numpy(tokens).to(torch.int64).unsqueeze(-1)  # (B, 1)
        ones = torch.ones((len(self.rows), 1), dtype=torch.int64)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=-1)  # (B, K + 1)
        pos = self.next_pos.unsqueeze(-1)  # (B, 1)
        self.next_pos = self.next_pos + 1
        return self._forward(ids, pos)

    def _forward(self, ids: Tensor, pos: Tensor) -> Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=self.attention_mask,
            position_ids=pos,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,  # the lm_head on the last position only
        )
        return out.logits[:, -1, :]  # (B, V)

    @property
    def cached_positions(self) -> int:
        """``B * K`` cache positions held (padding included; a ``SlackLayer``'s whole
        buffer), for the KV budget."""
        b, k = self.attention_mask.shape
        layer = self.cache.layers[0] if self.cache.layers else None
        return int(b * max(k, layer.capacity if isinstance(layer, SlackLayer) else 0))

    def merge(self, other: DecodeBatch) -> None:
        """Append ``other``'s rows (prefilled, not yet decoded further) after this batch's.

        Both batches must be at the same point of a step: their caches hold every
        token but the last sampled one (fed by the next :meth:`decode`). The
        shorter cache is left-padded (zeros, masked out) to ``K = max(K_a, K_b)``;
        positions are per row and unchanged, so a row's logits do not depend on
        the padding (up to float rounding).

        Raises:
            ValueError: a cache layer that is not a plain ``DynamicLayer``.
        """
        k = max(self.attention_mask.shape[1], other.attention_mask.shape[1])
        pairs = list(zip(self.cache.layers, other.cache.layers, strict=True))
        for a, b in pairs:
            if type(a) not in _PLAIN or type(b) not in _PLAIN:
                raise ValueError(f"cannot merge a {type(a).__name__} cache layer")
        for a, b in cast(list[tuple[DynamicLayer, DynamicLayer]], pairs):
            if a.keys is None or b.keys is None or a.values is None or b.values is None:
                raise ValueError("cannot merge a cache before its first forward")
            a.keys = torch.cat([_pad_seq(a.keys, k), _pad_seq(b.keys, k)], dim=0)
            a.values = torch.cat([_pad_seq(a.values, k), _pad_seq(b.values, k)], dim=0)
        self.attention_mask = torch.cat(
            [_pad_seq(self.attention_mask, k), _pad_seq(other.attention_mask, k)], dim=0
        )
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.rows = self.rows + other.rows

    def keep(self, indices: list[int]) -> None:
        """Keep only rows ``indices`` (in that order); drop the others from the cache."""
        if len(indices) == len(self.rows):
            return
        idx = torch.tensor(indices, dtype=torch.int64)
        self.rows = [self.rows[i] for i in indices]
        self.cache.batch_select_indices(idx)
        self.attention_mask = self.attention_mask[idx]
        self.next_pos = self.next_pos[idx]
        self._trim_left()

    def _trim_left(self) -> None:
        """Cut leading columns that are padding in every row (plain cache layers only)."""
        layers = self.cache.layers
        if not self.rows or not all(type(layer) in _PLAIN for layer in layers):
            return
        real = self.attention_mask.any(dim=0)  # (K,)
        first = int(real.int().argmax())
        if first == 0:
            return
        self.attention_mask = self.attention_mask[:, first:]
        for layer in cast(list[DynamicLayer], layers):
            if layer.keys is not None and layer.values is not None and layer.keys.numel() > 0:
                layer.keys = layer.keys[..., first:, :]
                layer.values = layer.values[..., first:, :]


def _pad_seq(x: Tensor, k: int) -> Tensor:
    """Left-pad ``x`` with zeros along its sequence axis to length ``k``.

    The sequence axis is the last one of a mask ``(B, K)`` and the second to last of
    keys / values ``(B, H, K, D)``.
    """
    axis = -1 if x.dim() == 2 else -2
    missing = k - x.shape[axis]
    if missing == 0:
        return x
    pad = (missing, 0) if axis == -1 else (0, 0, missing, 0)
    return torch.nn.functional.pad(x, pad)
