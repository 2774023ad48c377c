"""Pruned log-probs straight from hidden states in JAX: an LM head that never builds
the ``[B, T, V]`` logits (the counterpart of :mod:`dvp_client.train.fused_head`).

For ``u = (hidden @ W^T) / T`` (never materialised whole)::

    log pi_S(y) = u_y - logsumexp_{k in S} u_k
    log p(y)    = u_y - logsumexp_{k in V} u_k
    log Z_S     = logsumexp_S u - logsumexp_V u

Forward runs over vocabulary tiles of ``tile_size`` rows of W (``jax.lax.scan``)
with an online logsumexp; backward (a ``custom_vjp``) recomputes each tile and
accumulates ``d hidden = G @ W_tile`` and ``d W_tile = G^T @ hidden`` with
``G = d loss / d u`` of the tile (formulas in :mod:`.logprobs`). Extra memory is one
``(N, tile)`` float32 tile, the ``(V, H)`` weight gradient and ``(N,)`` vectors,
where N = B * T. The last tile overlaps the one before it when ``tile_size`` does
not divide V (its repeated columns are masked), so W is never padded or copied.
Math is float32 (float64 for float64 hidden states); gradients come back in the
dtypes of ``hidden`` and ``W``. Not handled: an LM-head bias or logit soft-capping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

from .logprobs import (
    DEFAULT_CHUNK_ELEMENTS,
    GREEDY_EPS,
    Mode,
    PrunedLogprobs,
    _check_values,
    _is_concrete,
    _map,
    bitmap_contains,
    bitmap_sizes,
)
from .rule import RuleArrays, compute_dtype, safe_mask
from .sets import bitmap_bytes, mask_to_bitmap

__all__ = ["DEFAULT_TILE_ELEMENTS", "pruned_logprobs_from_hidden"]

#: Elements of one logits tile (steps x vocabulary rows): 16 Mi, 64 MiB in float32.
DEFAULT_TILE_ELEMENTS = 1 << 24

_HI = jax.lax.Precision.HIGHEST


def _tile_bits(bitmap: Array, cols: Array) -> Array:
    """Bits of columns ``cols`` ``(tile,)`` of bitmaps ``(N, ceil(V / 8))``; bool ``(N, tile)``."""
    byte = jnp.take(bitmap, cols >> 3, axis=1)
    return ((byte >> (cols & 7).astype(jnp.uint8)) & 1).astype(bool)


def _tiles(v: int, tile: int) -> tuple[int, int]:
    """``(tile, number of tiles)`` with ``tile <= V``."""
    tile = min(tile, v)
    return tile, -(-v // tile)


def _tile_logits(h: Array, weight: Array, j: Array, tile: int, inv_t: Array) -> tuple[Array, ...]:
    """Tile j: ``(u (N, tile), cols (tile,), new (tile,) bool: columns not in an earlier tile)``."""
    v = weight.shape[0]
    start = jnp.minimum(j * tile, v - tile)
    w = jax.lax.dynamic_slice_in_dim(weight, start, tile, axis=0).astype(h.dtype)
    u = jnp.matmul(h, w.T, precision=_HI) * inv_t
    cols = start + jnp.arange(tile)
    return u, cols, cols >= j * tile, start


@jax.custom_vjp
def _fused(
    hidden: Array,
    weight: Array,
    tokens: Array,
    bitmap: Array,
    valid: Array,
    inv_t: Array,
    spec: Array,
) -> tuple[Array, Array, Array]:
    return _fused_fwd(hidden, weight, tokens, bitmap, valid, inv_t, spec)[0]


def _fused_fwd(hidden, weight, tokens, bitmap, valid, inv_t, spec):  # type: ignore[no-untyped-def]
    cdt = compute_dtype(hidden.dtype)
    h = hidden.astype(cdt)
    tile, k = _tiles(weight.shape[0], spec.shape[0])
    n = h.shape[0]
    neg = jnp.full((n,), -jnp.inf, cdt)

    def body(carry, j):  # type: ignore[no-untyped-def]
        m_v, s_v, m_s, s_s = carry
        u, cols, new, _ = _tile_logits(h, weight, j, tile, inv_t)
        u = jnp.where(new, u, -jnp.inf)
        us = jnp.where(_tile_bits(bitmap, cols), u, -jnp.inf)
        out = []
        for m, s, x in ((m_v, s_v, u), (m_s, s_s, us)):  # online logsumexp
            m2 = jnp.maximum(m, jnp.max(x, axis=-1))
            safe = jnp.where(jnp.isfinite(m2), m2, 0.0)
            s2 = s * jnp.exp(jnp.where(jnp.isfinite(m), m - safe, -jnp.inf))
            out += [m2, s2 + jnp.sum(jnp.exp(x - safe[:, None]), axis=-1)]
        return tuple(out), None

    zero = jnp.zeros((n,), cdt)
    (m_v, s_v, m_s, s_s), _ = jax.lax.scan(body, (neg, zero, neg, zero), jnp.arange(k))
    lse_v = m_v + jnp.log(s_v)
    lse_s = jnp.where(jnp.isfinite(m_s), m_s, 0.0) + jnp.log(s_s)
    w_y = jnp.take(weight, tokens, axis=0).astype(cdt)  # (N, H)
    u_y = jnp.sum(h * w_y, axis=-1) * inv_t
    z = jnp.zeros_like(u_y)
    out = (
        jnp.where(valid, u_y - lse_s, z),
        jnp.where(valid, u_y - lse_v, z),
        jnp.where(valid, lse_s - lse_v, z),
    )
    safe_s = jnp.where(valid, lse_s, lse_v)  # padding rows: keep exp(u - lse) <= 1
    return out, (hidden, weight, tokens, bitmap, valid, inv_t, spec, lse_v, safe_s)


def _fused_bwd(res, cot):  # type: ignore[no-untyped-def]
    hidden, weight, tokens, bitmap, valid, inv_t, spec, lse_v, lse_s = res
    cdt = compute_dtype(hidden.dtype)
    h = hidden.astype(cdt)
    g_s, g_f, g_z = (jnp.where(valid, c, 0.0).astype(cdt)[:, None] for c in cot)
    tile, k = _tiles(weight.shape[0], spec.shape[0])

    def body(carry, j):  # type: ignore[no-untyped-def]
        dh, dw = carry
        u, cols, new, start = _tile_logits(h, weight, j, tile, inv_t)
        p = jnp.exp(u - lse_v[:, None])
        pi_s = jnp.where(_tile_bits(bitmap, cols), jnp.exp(u - lse_s[:, None]), 0.0)
        onehot = cols == tokens[:, None]
        g = (g_s + g_f) * onehot - g_s * pi_s - g_f * p + g_z * (pi_s - p)
        g = jnp.where(new, g * inv_t, 0.0)  # (N, tile)
        w = jax.lax.dynamic_slice_in_dim(weight, start, tile, axis=0).astype(cdt)
        dh = dh + jnp.matmul(g, w, precision=_HI)
        dw_tile = jax.lax.dynamic_slice_in_dim(dw, start, tile, axis=0)
        dw_tile = dw_tile + jnp.matmul(g.T, h, precision=_HI)
        return (dh, jax.lax.dynamic_update_slice_in_dim(dw, dw_tile, start, axis=0)), None

    init = (jnp.zeros_like(h), jnp.zeros(weight.shape, cdt))
    (dh, dw), _ = jax.lax.scan(body, init, jnp.arange(k))
    return (
        dh.astype(hidden.dtype),
        dw.astype(weight.dtype),
        None,
        None,
        None,
        jnp.zeros_like(inv_t),
        None,
    )


_fused.defvjp(_fused_fwd, _fused_bwd)


def pruned_logprobs_from_hidden(
    hidden: Array,
    lm_head_weight: Array,
    tokens: Array,
    safe_bitmap: Array | None = None,
    temperature: float | Array = 1.0,
    *,
    mode: Mode = "replay",
    rule: RuleArrays | None = None,
    mask: Array | None = None,
    tile_size: int | None = None,
    chunk_size: int | None = None,
) -> PrunedLogprobs:
    """``pruned_logprobs(hidden @ lm_head_weight^T, ...)`` without the logits.

    Args:
        hidden: ``[B, T, H]`` float (any float dtype), the final hidden states (after
            the final norm) that predict ``tokens``.
        lm_head_weight: ``(V, H)``, the output embedding (tied or not), any float dtype.
        tokens: integer ``[B, T]``.
        safe_bitmap: uint8 ``[B, T, ceil(V / 8)]``, the engine's sets (as for
            :func:`.logprobs.pruned_logprobs`).
        temperature: T (0 = greedy, scored at T = 1).
        mode: ``"replay"`` or ``"recompute"`` (S' from the logits, built ``chunk_size``
            steps at a time without gradient).
        rule: recompute mode's rule.
        mask: bool ``[B, T]``, the steps to compute; others give 0 and no gradient.
        tile_size: vocabulary rows per tile; default ``DEFAULT_TILE_ELEMENTS // (B * T)``
            (at least 8).
        chunk_size: steps per chunk of recompute mode's rule pass.

    Returns:
        A :class:`.logprobs.PrunedLogprobs`, differentiable with respect to ``hidden``
        and the weight.

    Raises:
        ValueError: shapes or dtypes that do not fit; the value checks of
            ``pruned_logprobs`` on eager inputs.
    """
    if hidden.ndim != 3 or lm_head_weight.ndim != 2 or lm_head_weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"hidden must be [B, T, H] and lm_head_weight (V, H), got "
            f"{tuple(hidden.shape)} and {tuple(lm_head_weight.shape)}"
        )
    b, t, hdim = hidden.shape
    v = lm_head_weight.shape[0]
    if tokens.shape != (b, t) or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"tokens must be integer [B, T] = {[b, t]}, got {tokens.dtype} {list(tokens.shape)}"
        )
    if mask is not None and (mask.shape != (b, t) or mask.dtype != jnp.bool_):
        raise ValueError(f"mask must be bool {[b, t]}, got {mask.dtype} {list(mask.shape)}")
    if safe_bitmap is not None and safe_bitmap.shape != (b, t, bitmap_bytes(v)):
        raise ValueError(
            f"safe_bitmap must be uint8 {[b, t, bitmap_bytes(v)]}, got {list(safe_bitmap.shape)}"
        )
    valid = jnp.ones((b, t), bool) if mask is None else mask
    tokens = jnp.where(valid, tokens, 0).astype(jnp.int32)
    if _is_concrete(tokens, safe_bitmap, valid):
        _check_values(tokens, safe_bitmap, valid, v)
    n = b * t
    tile = max(8, DEFAULT_TILE_ELEMENTS // max(n, 1)) if tile_size is None else tile_size
    if tile < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile}")
    temp = jnp.asarray(temperature, dtype=compute_dtype(hidden.dtype))
    inv_t = jnp.where(temp < GREEDY_EPS, 1.0, 1.0 / jnp.maximum(temp, GREEDY_EPS))
    disagreement = not_in = None
    if mode == "replay":
        if safe_bitmap is None:
            raise ValueError(
                "replay mode needs the engine's sets (safe_bitmap), or use mode='recompute'"
            )
        bitmap = safe_bitmap
    elif mode == "recompute":
        if rule is None:
            raise ValueError("recompute mode needs rule=")
        chunk = max(1, DEFAULT_CHUNK_ELEMENTS // v) if chunk_size is None else chunk_size
        bitmap = _recompute(hidden, lm_head_weight, temp, rule, chunk)
        not_in = valid & ~bitmap_contains(bitmap, tokens)
        if safe_bitmap is not None:
            disagreement = jnp.where(valid, bitmap_sizes(jnp.bitwise_xor(bitmap, safe_bitmap)), 0)
    else:
        raise ValueError(f"mode must be 'replay' or 'recompute', got {mode!r}")
    in_set = valid if not_in is None else valid & ~not_in
    spec = jnp.zeros((min(tile, v), 0), jnp.int8)  # the tile size, as a static shape
    args = (tokens.reshape(n), bitmap.reshape(n, -1))
    masked, full, log_z = _fused(
        hidden.reshape(n, hdim), lm_head_weight, *args, in_set.reshape(n), inv_t, spec
    )
    if not_in is not None:  # y not in S': log p(y) and log Z_S' still reported (no grad)
        _, f2, z2 = _fused(
            jax.lax.stop_gradient(hidden).reshape(n, hdim),
            jax.lax.stop_gradient(lm_head_weight),
            *args,
            valid.reshape(n),
            inv_t,
            spec,
        )
        sel = not_in.reshape(n)
        full, log_z = jnp.where(sel, f2, full), jnp.where(sel, z2, log_z)
    return PrunedLogprobs(
        logprobs=masked.reshape(b, t),
        full_logprobs=full.reshape(b, t),
        log_z=log_z.reshape(b, t),
        safe_sizes=jnp.where(valid, bitmap_sizes(bitmap), 0),
        mask=in_set,
        set_disagreement=disagreement,
        y_not_in_set=not_in,
    )


def _recompute(hidden: Array, weight: Array, temp: Array, rule: RuleArrays, chunk: int) -> Array:
    """S' from the logits, as a bitmap ``[B, T, ceil(V / 8)]``, ``chunk`` steps at a time."""
    b, t, hdim = hidden.shape
    n = b * t
    cdt = compute_dtype(hidden.dtype)
    w = jax.lax.stop_gradient(weight).astype(cdt)
    cols = [
        jnp.broadcast_to(jnp.asarray(x, dt), (b, t)).reshape(n)
        for x, dt in ((rule.min_p, jnp.float32), (rule.top_k, jnp.int32), (rule.top_p, jnp.float32))
    ]

    def one(h: Array, mp: Array, tk: Array, tp: Array) -> Array:
        logits = jnp.matmul(h.astype(cdt), w.T, precision=_HI)
        return mask_to_bitmap(safe_mask(logits, RuleArrays(temp, mp, tk, tp)))

    flat = jax.lax.stop_gradient(hidden).reshape(n, hdim)
    return _map(one, (flat, *cols), chunk).reshape(b, t, -1)
