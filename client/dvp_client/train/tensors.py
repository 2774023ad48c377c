"""Rollouts as padded torch tensors, and safe sets as a compact index structure.

Layout of :class:`RolloutTensors` for ``B`` rollouts with prompt lengths ``P_i``
and completion lengths ``T_i`` (``P = max P_i``, ``T = max T_i``, ``L = P + T``)::

    input_ids   [B, L]   pad .. pad  prompt_i  completion_i  pad .. pad
                         |<--- P (left-padded) -->|<--- T (right-padded) --->|

Prompts are left-padded and completions right-padded (verl's layout), so the
logits that predict completion step ``t`` sit at column ``P - 1 + t`` for every
row: ``logits[:, P - 1 : P - 1 + T]`` is a view, not a copy
(:meth:`RolloutTensors.completion_logits`). Pass ``position_ids`` to the model:
with left padding the positions do not start at column 0.

Safe sets travel as CSR over the ``B * T`` flattened steps (step ``(b, t)`` is
row ``b * T + t``; padding steps are empty): ``ids[offsets[r]:offsets[r + 1]]``.
:meth:`SafeSets.to_index` turns that into ``(row, token)`` index tensors with no
Python loop per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from dvp_schemas import PruningRule, Rollout, RolloutResponse
from torch import Tensor

from ..safe_ids import as_list_form, expand_full
from ..versions import rollout_versions

__all__ = ["RolloutTensors", "SafeSets", "rollouts_to_tensors"]


@dataclass(frozen=True)
class SafeSets:
    """Per-step safe sets of a ``[B, T]`` batch of steps.

    Attributes:
        shape: ``(B, T)``.
        offsets: int64 ``(B * T + 1,)`` CSR offsets over flattened steps, or None
            when every set is the whole vocabulary (the rule prunes nothing).
        ids: int64 ``(nnz,)`` token ids of all sets (ascending within a step), or None.
        temperature: the temperature the sets were built at (the rollouts'), if known;
            :func:`dvp_client.train.objective.pruned_logprobs` checks it against its own.
        rule: the rule the sets were built with, if known (the default for recompute mode).
    """

    shape: tuple[int, int]
    offsets: Tensor | None
    ids: Tensor | None
    temperature: float | None = None
    rule: PruningRule | None = None

    def __post_init__(self) -> None:
        if (self.offsets is None) != (self.ids is None):
            raise ValueError("offsets and ids must both be given or both be None")
        if self.offsets is not None and self.ids is not None:
            n = self.shape[0] * self.shape[1]
            if self.offsets.dtype != torch.int64 or self.ids.dtype != torch.int64:
                raise ValueError(
                    f"offsets and ids must be int64, got {self.offsets.dtype}, {self.ids.dtype}"
                )
            if self.offsets.shape != (n + 1,):
                raise ValueError(
                    f"offsets must be shaped ({n + 1},) for steps {self.shape}, "
                    f"got {tuple(self.offsets.shape)}"
                )

    @property
    def is_full(self) -> bool:
        """True when every set is the whole vocabulary."""
        return self.offsets is None

    @classmethod
    def full(
        cls,
        shape: tuple[int, int],
        temperature: float | None = None,
        rule: PruningRule | None = None,
    ) -> SafeSets:
        """Sets that are the whole vocabulary at every step."""
        return cls(shape=shape, offsets=None, ids=None, temperature=temperature, rule=rule)

    @classmethod
    def from_mask(cls, mask: Tensor, temperature: float | None = None) -> SafeSets:
        """CSR sets from a bool mask ``[B, T, V]``."""
        if mask.dim() != 3 or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool [B, T, V], got {mask.dtype} {tuple(mask.shape)}")
        b, t, v = mask.shape
        flat = mask.reshape(b * t, v)
        rows, ids = flat.nonzero(as_tuple=True)  # row-major: ids ascending within a row
        counts = torch.bincount(rows, minlength=b * t)
        offsets = torch.zeros(b * t + 1, dtype=torch.int64, device=mask.device)
        offsets[1:] = torch.cumsum(counts, 0)
        return cls(shape=(b, t), offsets=offsets, ids=ids, temperature=temperature)

    def sizes(self, vocab_size: int | None = None) -> Tensor:
        """``|S|`` per step, int64 ``[B, T]`` (``vocab_size`` needed for full sets)."""
        if self.offsets is None:
            if vocab_size is None:
                raise ValueError("sizes of full sets need vocab_size")
            return torch.full(self.shape, vocab_size, dtype=torch.int64)
        return torch.diff(self.offsets).view(self.shape)

    def to_index(self) -> tuple[Tensor, Tensor]:
        """``(row, token)`` int64 ``(nnz,)`` each; row is the flat step ``b * T + t``."""
        if self.offsets is None or self.ids is None:
            raise ValueError("full sets have no index form; use sizes() or to_mask()")
        n = self.shape[0] * self.shape[1]
        rows = torch.repeat_interleave(
            torch.arange(n, device=self.offsets.device), torch.diff(self.offsets)
        )
        return rows, self.ids

    def to_mask(self, vocab_size: int) -> Tensor:
        """Dense bool mask ``[B, T, V]`` (memory ``B * T * V`` bytes)."""
        b, t = self.shape
        device = self.offsets.device if self.offsets is not None else None
        if self.offsets is None:
            return torch.ones(b, t, vocab_size, dtype=torch.bool, device=device)
        mask = torch.zeros(b * t, vocab_size, dtype=torch.bool, device=device)
        rows, ids = self.to_index()
        mask[rows, ids] = True
        return mask.view(b, t, vocab_size)

    def to(self, device: torch.device | str) -> SafeSets:
        """A copy on ``device``."""
        if self.offsets is None or self.ids is None:
            return self
        return replace(self, offsets=self.offsets.to(device), ids=self.ids.to(device))


@dataclass(frozen=True)
class RolloutTensors:
    """A rollout batch as padded tensors (see the module docstring for the layout).

    Attributes:
        input_ids: int64 ``[B, P + T]``, prompt (left-padded) then completion (right-padded).
        attention_mask: int64 ``[B, P + T]``, 1 on real tokens.
        position_ids: int64 ``[B, P + T]``, ``cumsum(attention_mask) - 1`` clamped at 0.
        prompt_length: ``P``, the padded prompt width.
        tokens: int64 ``[B, T]``, the completions ``y`` (``pad_id`` after the end).
        loss_mask: bool ``[B, T]``, True on generated tokens.
        engine_logprobs: float32 ``[B, T]``, engine ``log p(y)``; NaN where the engine
            gave null, 0 on padding.
        engine_masked_logprobs: float32 ``[B, T]``, engine ``log pi_S(y)``; 0 on padding.
        engine_safe_logmass: float32 ``[B, T]``, engine ``log Z_S``; NaN where null.
        safe_sizes: int64 ``[B, T]``, engine ``|S|``; 0 on padding.
        safe: the replayed safe sets, or None when the rule prunes and the server was
            not asked for them (``return_safe_token_ids``).
        group_ids: int64 ``[B]``, the prompt index of each rollout (GRPO groups).
        sample_index: int64 ``[B]``.
        policy_version: int64 ``[B]``, the version of each rollout's first token.
        token_policy_versions: int64 ``[B, T]``, the version that sampled each token
            (in-flight updates: ``Rollout.version_spans``); padding repeats the row's last.
        token_kv_versions: int64 ``[B, T]``, the oldest version of the keys / values
            each token's context held; padding repeats the row's last.
        temperature: the rollouts' sampling temperature.
        rule: the pruning rule the rollouts were sampled with.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    prompt_length: int
    tokens: Tensor
    loss_mask: Tensor
    engine_logprobs: Tensor
    engine_masked_logprobs: Tensor
    engine_safe_logmass: Tensor
    safe_sizes: Tensor
    safe: SafeSets | None
    group_ids: Tensor
    sample_index: Tensor
    policy_version: Tensor
    temperature: float
    rule: PruningRule
    token_policy_versions: Tensor | None = None
    token_kv_versions: Tensor | None = None

    def completion_logits(self, logits: Tensor) -> Tensor:
        """The logits that predict each completion step, ``[B, T, V]``, as a view.

        Args:
            logits: ``[B, P + T, V]`` for ``input_ids``, or ``[B, T + 1, V]`` when the
                model was run with ``logits_to_keep = T + 1``.

        Raises:
            ValueError: ``logits`` has neither width.
        """
        b, t = self.tokens.shape
        p = self.prompt_length
        if logits.dim() != 3 or logits.shape[0] != b:
            raise ValueError(f"logits must be [{b}, L, V], got {tuple(logits.shape)}")
        if logits.shape[1] == p + t:
            return logits[:, p - 1 : p - 1 + t]
        if logits.shape[1] == t + 1:
            return logits[:, :t]
        raise ValueError(
            f"logits have {logits.shape[1]} positions; expected {p + t} (prompt + completion) "
            f"or {t + 1} (logits_to_keep = T + 1)"
        )


def _pad(
    rows: Sequence[np.ndarray], width: int, fill: float, dtype: type, left: bool
) -> np.ndarray:
    """Stack ragged 1-d arrays into ``(len(rows), width)``, padding left or right."""
    out: np.ndarray = np.full((len(rows), width), fill, dtype=dtype)
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    if lengths.sum() == 0:
        return out
    flat = np.concatenate(rows).astype(dtype, copy=False)
    row_idx = np.repeat(np.arange(len(rows)), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    col = np.arange(len(flat)) - starts
    if left:
        col += np.repeat(width - lengths, lengths)
    out[row_idx, col] = flat
    return out


def _float_field(r: Rollout, i: int, name: str, n: int) -> np.ndarray:
    """A per-step float field of rollout i as float32 (None -> NaN), length-checked."""
    values = getattr(r, name)
    if values is None:
        return np.full(n, np.nan, dtype=np.float32)
    if len(values) != n:
        raise ValueError(f"rollouts[{i}].{name} has {len(values)} entries, token_ids has {n}")
    return np.asarray(values, dtype=np.float64).astype(np.float32)


def _csr(
    response: RolloutResponse, t_max: int, sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Global CSR (offsets over B * T steps, ids) from each rollout's own CSR.

    A step sent as the whole-vocabulary marker (an empty row, ``safe_sizes == V``)
    gets the ids ``0 .. V - 1``, unless every step is such a step: then None (the
    caller uses :meth:`SafeSets.full`, which needs no ids at all).
    """
    rows: list[tuple[np.ndarray, np.ndarray, int | None]] = []
    all_full = True
    for i, r in enumerate(response.rollouts):
        st = as_list_form(r.safe_token_ids, r.safe_sizes)  # type: ignore[arg-type]
        n = len(r.token_ids)
        if len(st.offsets) != n + 1:
            raise ValueError(
                f"rollouts[{i}].safe_token_ids.offsets has {len(st.offsets)} entries, "
                f"expected {n + 1}"
            )
        offsets = np.asarray(st.offsets, dtype=np.int64)
        got = np.diff(offsets)
        full = (got == 0) & (sizes[i, :n] == (st.vocab_size or -1))  # marker rows
        bad = np.nonzero((got != sizes[i, :n]) & ~full)[0]
        if bad.size:
            t = int(bad[0])
            raise ValueError(
                f"rollouts[{i}] step {t}: safe_token_ids has {got[t]} ids, "
                f"safe_sizes says {sizes[i, t]}"
            )
        all_full = all_full and bool(full.all())
        rows.append((offsets, np.asarray(st.ids, dtype=np.int64), st.vocab_size))
    if all_full:
        return None
    ids = []
    for i, (offsets, flat, vocab) in enumerate(rows):
        if vocab:
            flat = expand_full(offsets, flat, sizes[i, : len(offsets) - 1], vocab)[1]
        ids.append(flat)
    offsets = np.zeros(len(response.rollouts) * t_max + 1, dtype=np.int64)
    np.cumsum(sizes.reshape(-1), out=offsets[1:])
    return offsets, (np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64))


def rollouts_to_tensors(
    response: RolloutResponse,
    *,
    device: torch.device | str | None = None,
    pad_id: int = 0,
) -> RolloutTensors:
    """Convert a rollout response into padded tensors on ``device``.

    Args:
        response: the server's rollouts.
        device: where the tensors go (default: CPU).
        pad_id: the id written into padding positions of ``input_ids`` / ``tokens``.

    Returns:
        A :class:`RolloutTensors`.

    Raises:
        ValueError: an empty response, per-step arrays of different lengths, safe
            sets whose sizes disagree with ``safe_sizes``, or some rollouts with safe
            ids and some without. Messages name the rollout and the field.
    """
    rolls = response.rollouts
    if not rolls:
        raise ValueError("response has no rollouts")
    lengths = [len(r.token_ids) for r in rolls]
    for i, r in enumerate(rolls):
        if not r.prompt_token_ids:
            raise ValueError(f"rollouts[{i}].prompt_token_ids is empty")
        for name in ("masked_logprobs", "safe_sizes"):
            if len(getattr(r, name)) != lengths[i]:
                raise ValueError(
                    f"rollouts[{i}].{name} has {len(getattr(r, name))} entries, "
                    f"token_ids has {lengths[i]}"
                )
    t_max = max(lengths)
    p_max = max(len(r.prompt_token_ids) for r in rolls)
    prompts = _pad([np.asarray(r.prompt_token_ids) for r in rolls], p_max, pad_id, np.int64, True)
    comps = _pad([np.asarray(r.token_ids) for r in rolls], t_max, pad_id, np.int64, False)
    ones = [np.ones(len(r.prompt_token_ids), np.int64) for r in rolls]
    attn = np.concatenate(
        [
            _pad(ones, p_max, 0, np.int64, True),
            _pad([np.ones(n, np.int64) for n in lengths], t_max, 0, np.int64, False),
        ],
        axis=1,
    )

    def floats(name: str) -> np.ndarray:
        rows = [_float_field(r, i, name, lengths[i]) for i, r in enumerate(rolls)]
        return _pad(rows, t_max, 0.0, np.float32, False)

    sizes = _pad([np.asarray(r.safe_sizes) for r in rolls], t_max, 0, np.int64, False)
    has_ids = [r.safe_token_ids is not None for r in rolls]
    safe = _safe_sets(response, has_ids, t_max, sizes)

    def dev(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a).to(device)

    versions = [rollout_versions(r) for r in rolls]

    attn_t = dev(attn)
    return RolloutTensors(
        input_ids=dev(np.concatenate([prompts, comps], axis=1)),
        attention_mask=attn_t,
        position_ids=(attn_t.cumsum(-1) - 1).clamp(min=0),
        prompt_length=p_max,
        tokens=dev(comps),
        loss_mask=dev(_pad([np.ones(n, bool) for n in lengths], t_max, False, np.bool_, False)),
        engine_logprobs=dev(floats("logprobs")),
        engine_masked_logprobs=dev(floats("masked_logprobs")),
        engine_safe_logmass=dev(floats("safe_logmass")),
        safe_sizes=dev(sizes),
        safe=None if safe is None else safe.to(device or "cpu"),
        group_ids=dev(np.asarray([r.prompt_index for r in rolls], dtype=np.int64)),
        sample_index=dev(np.asarray([r.sample_index for r in rolls], dtype=np.int64)),
        policy_version=dev(np.asarray([r.policy_version for r in rolls], dtype=np.int64)),
        temperature=response.temperature,
        rule=response.pruning,
        token_policy_versions=dev(_pad_last([v[0] for v in versions], t_max)),
        token_kv_versions=dev(_pad_last([v[1] for v in versions], t_max)),
    )


def _pad_last(rows: list[np.ndarray], width: int) -> np.ndarray:
    """int64 ``[B, width]``: each row, right-padded with its last value (0 if empty)."""
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        if len(r):
            out[i, len(r) :] = r[-1]
    return out


def _safe_sets(
    response: RolloutResponse, has_ids: list[bool], t_max: int, sizes: np.ndarray
) -> SafeSets | None:
    """The replayed sets: CSR when every rollout has ids, full when nothing is pruned."""
    shape = (len(has_ids), t_max)
    if all(has_ids):
        csr = _csr(response, t_max, sizes)
        if csr is None:  # every step is the whole vocabulary
            return SafeSets.full(shape, temperature=response.temperature, rule=response.pruning)
        offsets, ids = csr
        return SafeSets(
            shape=shape,
            offsets=torch.from_numpy(offsets),
            ids=torch.from_numpy(ids),
            temperature=response.temperature,
            rule=response.pruning,
        )
    if any(has_ids):
        i = has_ids.index(False)
        raise ValueError(f"rollouts[{i}].safe_token_ids is missing while other rollouts have it")
    if not response.pruning.prunes and response.temperature > 0:  # greedy: S = {argmax}
        return SafeSets.full(shape, temperature=response.temperature, rule=response.pruning)
    return None
