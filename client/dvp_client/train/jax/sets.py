"""Replay of the engine's safe sets in fixed shapes, and rollout batches as arrays.

The sets of a ``[B, T]`` batch of steps travel to ``jit`` as one bitmap
``uint8 [B, T, ceil(V / 8)]``: id v is in S iff bit ``v % 8`` (least significant
first) of byte ``v // 8`` is set, the wire's "dense" kind (docs/protocol.md,
section 1). The shape depends only on ``(B, T, V)``, never on the set sizes, so one
compiled function serves every batch of a shape; it costs ``V / 8`` bytes per step
(1/32 of the float32 logits). A whole-vocabulary step (the marker) is all ones;
padding steps are all zeros.

:func:`rollouts_to_arrays` turns a :class:`dvp_client.RolloutBatch` (CSR sets, or
packed ones, decoded with :func:`dvp_client.safe_ids.as_list_form`) into padded
numpy arrays in the layout of ``RolloutBatch.to_torch``: prompts left-padded to
``P``, completions right-padded to ``T`` (optionally rounded up to a multiple of
``pad_steps_to`` so that ``jit`` sees few shapes); the logits that predict step t
sit at column ``P - 1 + t``. numpy and jax only: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from dvp_schemas import PruningRule, RolloutResponse
from jax import Array

from ...safe_ids import as_list_form

__all__ = [
    "RolloutArrays",
    "bitmap_bytes",
    "mask_to_bitmap",
    "rollouts_to_arrays",
    "unpack_bitmap",
]


def bitmap_bytes(vocab_size: int) -> int:
    """``ceil(V / 8)``, the bytes of one step's bitmap."""
    return (vocab_size + 7) // 8


def unpack_bitmap(bitmap: Array, vocab_size: int) -> Array:
    """Bitmap ``uint8 (..., ceil(V / 8))`` -> bool ``(..., V)`` (jit-able; LSB first)."""
    shifts = jnp.arange(8, dtype=jnp.uint8)
    bits = (bitmap[..., :, None] >> shifts) & jnp.uint8(1)  # (..., V / 8, 8)
    return bits.reshape(*bitmap.shape[:-1], -1)[..., :vocab_size].astype(bool)


def mask_to_bitmap(mask: Array | np.ndarray) -> Array:
    """Bool ``(..., V)`` -> bitmap ``uint8 (..., ceil(V / 8))`` (jit-able)."""
    v = mask.shape[-1]
    pad = bitmap_bytes(v) * 8 - v
    m = jnp.pad(jnp.asarray(mask, dtype=jnp.uint8), [(0, 0)] * (mask.ndim - 1) + [(0, pad)])
    m = m.reshape(*mask.shape[:-1], -1, 8)
    return jnp.sum(m << jnp.arange(8, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)


@dataclass(frozen=True)
class RolloutArrays:
    """A rollout batch as padded numpy arrays (pass them to ``jnp.asarray`` or ``jit``).

    Attributes:
        input_ids: int32 ``[B, P + T]``, prompt (left-padded) then completion.
        attention_mask: int32 ``[B, P + T]``, 1 on real tokens.
        position_ids: int32 ``[B, P + T]``, ``cumsum(attention_mask) - 1`` clamped at 0.
        prompt_length: ``P``.
        tokens: int32 ``[B, T]``, the completions (``pad_id`` after the end).
        loss_mask: bool ``[B, T]``, True on generated tokens.
        engine_logprobs: float32 ``[B, T]`` engine ``log p(y)``; NaN where null, 0 on padding.
        engine_masked_logprobs: float32 ``[B, T]`` engine ``log pi_S(y)``; 0 on padding.
        engine_safe_logmass: float32 ``[B, T]`` engine ``log Z_S``; NaN where null.
        safe_sizes: int32 ``[B, T]`` engine ``|S|``; 0 on padding.
        safe_bitmap: uint8 ``[B, T, ceil(V / 8)]``, the replayed sets, or None when the
            rule prunes and the sets were not returned (recompute mode only).
        group_ids: int32 ``[B]``, the prompt index (GRPO groups).
        policy_version: int64 ``[B]``.
        vocab_size: V.
        temperature: the rollouts' sampling temperature.
        rule: the pruning rule they were sampled with.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    prompt_length: int
    tokens: np.ndarray
    loss_mask: np.ndarray
    engine_logprobs: np.ndarray
    engine_masked_logprobs: np.ndarray
    engine_safe_logmass: np.ndarray
    safe_sizes: np.ndarray
    safe_bitmap: np.ndarray | None
    group_ids: np.ndarray
    policy_version: np.ndarray
    vocab_size: int
    temperature: float
    rule: PruningRule


def _pad_rows(
    rows: list[np.ndarray], width: int, fill: float, dtype: type, left: bool
) -> np.ndarray:
    out: np.ndarray = np.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            if left:
                out[i, width - len(r) :] = r
            else:
                out[i, : len(r)] = r
    return out


def _floats(values: list[float | None] | None, n: int, where: str) -> np.ndarray:
    if values is None:
        return np.full(n, np.nan, dtype=np.float32)
    if len(values) != n:
        raise ValueError(f"{where} has {len(values)} entries, token_ids has {n}")
    return np.array([np.nan if x is None else x for x in values], dtype=np.float32)


def _bitmap(
    response: RolloutResponse, t_max: int, sizes: np.ndarray, vocab_size: int
) -> np.ndarray | None:
    """The sets as a bitmap ``[B, T, ceil(V / 8)]`` (None when not returned and pruned)."""
    rolls = response.rollouts
    b, nbytes = len(rolls), bitmap_bytes(vocab_size)
    has = [r.safe_token_ids is not None for r in rolls]
    if not all(has):
        if any(has):
            raise ValueError(f"rollouts[{has.index(False)}].safe_token_ids is missing")
        if response.pruning.prunes or response.temperature <= 0:
            return None
        out = np.zeros((b, t_max, nbytes), dtype=np.uint8)  # nothing pruned: all ones
        full = np.packbits(np.ones(vocab_size, bool), bitorder="little")
        for i, r in enumerate(rolls):
            out[i, : len(r.token_ids)] = full
        return out
    bits = np.zeros((b, t_max, nbytes * 8), dtype=bool)
    for i, r in enumerate(rolls):
        n = len(r.token_ids)
        st = as_list_form(r.safe_token_ids, r.safe_sizes)  # type: ignore[arg-type]
        offsets, ids = np.asarray(st.offsets, np.int64), np.asarray(st.ids, np.int64)
        if len(offsets) != n + 1:
            raise ValueError(f"rollouts[{i}].safe_token_ids.offsets has {len(offsets)} entries")
        got = np.diff(offsets)
        marker = (got == 0) & (sizes[i, :n] == vocab_size)
        bad = np.flatnonzero((got != sizes[i, :n]) & ~marker)
        if bad.size:
            t = int(bad[0])
            raise ValueError(f"rollouts[{i}] step {t}: {got[t]} ids, safe_sizes says {sizes[i, t]}")
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"rollouts[{i}]: a safe-set id is outside [0, {vocab_size})")
        steps = np.repeat(np.arange(n), got)
        bits[i, steps, ids] = True
        bits[i, np.flatnonzero(marker), :vocab_size] = True
    return np.packbits(bits, axis=-1, bitorder="little")


def rollouts_to_arrays(
    response: RolloutResponse,
    *,
    vocab_size: int,
    pad_id: int = 0,
    pad_steps_to: int = 1,
) -> RolloutArrays:
    """Convert a rollout response into padded arrays (layout in the module docstring).

    Args:
        response: the server's rollouts (a ``RolloutBatch``, CSR or packed sets).
        vocab_size: V, the model's vocabulary (the logits' last dimension).
        pad_id: written into padding positions of ``input_ids`` / ``tokens``.
        pad_steps_to: round T up to a multiple of this (fewer shapes for ``jit``).

    Returns:
        A :class:`RolloutArrays`.

    Raises:
        ValueError: no rollouts, ragged per-step arrays, sets that disagree with
            ``safe_sizes``, a token or set id outside the vocabulary, or some
            rollouts with sets and some without (messages name the rollout).
    """
    rolls = response.rollouts
    if not rolls:
        raise ValueError("response has no rollouts")
    if pad_steps_to < 1:
        raise ValueError(f"pad_steps_to must be >= 1, got {pad_steps_to}")
    lengths = [len(r.token_ids) for r in rolls]
    for i, r in enumerate(rolls):
        if not r.prompt_token_ids:
            raise ValueError(f"rollouts[{i}].prompt_token_ids is empty")
        if len(r.safe_sizes) != lengths[i] or len(r.masked_logprobs) != lengths[i]:
            raise ValueError(f"rollouts[{i}]: per-step arrays differ in length from token_ids")
        if any(not 0 <= y < vocab_size for y in r.token_ids):
            raise ValueError(f"rollouts[{i}]: a token id is outside [0, {vocab_size})")
    t_max = -(-max(max(lengths), 1) // pad_steps_to) * pad_steps_to
    p_max = max(len(r.prompt_token_ids) for r in rolls)
    prompts = _pad_rows(
        [np.asarray(r.prompt_token_ids) for r in rolls], p_max, pad_id, np.int32, True
    )
    comps = _pad_rows([np.asarray(r.token_ids) for r in rolls], t_max, pad_id, np.int32, False)
    lm = _pad_rows([np.ones(n, bool) for n in lengths], t_max, False, np.bool_, False)
    pm = _pad_rows(
        [np.ones(len(r.prompt_token_ids), bool) for r in rolls], p_max, False, np.bool_, True
    )
    attn = np.concatenate([pm, lm], axis=1).astype(np.int32)
    sizes = _pad_rows([np.asarray(r.safe_sizes) for r in rolls], t_max, 0, np.int32, False)

    def floats(name: str) -> np.ndarray:
        rows = [
            _floats(getattr(r, name), lengths[i], f"rollouts[{i}].{name}")
            for i, r in enumerate(rolls)
        ]
        return _pad_rows(rows, t_max, 0.0, np.float32, False)

    return RolloutArrays(
        input_ids=np.concatenate([prompts, comps], axis=1),
        attention_mask=attn,
        position_ids=np.maximum(np.cumsum(attn, axis=1) - 1, 0).astype(np.int32),
        prompt_length=p_max,
        tokens=comps,
        loss_mask=lm,
        engine_logprobs=floats("logprobs"),
        engine_masked_logprobs=floats("masked_logprobs"),
        engine_safe_logmass=floats("safe_logmass"),
        safe_sizes=sizes,
        safe_bitmap=_bitmap(response, t_max, sizes, vocab_size),
        group_ids=np.asarray([r.prompt_index for r in rolls], dtype=np.int32),
        policy_version=np.asarray([r.policy_version for r in rolls], dtype=np.int64),
        vocab_size=vocab_size,
        temperature=response.temperature,
        rule=response.pruning,
    )
