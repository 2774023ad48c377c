"""Pruned log-probs on the trainer side in JAX: ``log pi_S(y)`` from the trainer's logits.

Per generated step with trainer logits ``z'`` (``[B, T, V]``), temperature T
(``T < 1e-5``: greedy, scored at T = 1) and ``u = z' / T`` (docs/protocol.md, section 4)::

    log pi_S(y) = u_y - logsumexp_{v in S} u_v        (replay: S from the engine)
    log p(y)    = u_y - logsumexp_{v in V} u_v
    log Z_S     = logsumexp_S u - logsumexp_V u

``mode="recompute"`` builds S' from ``z'`` by the rule (:mod:`.rule`), masks out
steps whose y is not in S', and reports ``|S xor S'|`` when the engine's sets are
given. The gradient is analytic (a ``custom_vjp``)::

    d log pi_S(y) / d z_k = (1[k = y] - pi_S(k) 1[k in S]) / T
    d log p(y)    / d z_k = (1[k = y] - p(k)) / T
    d log Z_S     / d z_k = (pi_S(k) 1[k in S] - p(k)) / T

so backward keeps only the logits (the caller's array), the sets' bitmap and two
``[B, T]`` normalisers: never a second ``[B, T, V]`` array (autodiff of
``log_softmax`` would keep its float32 output). Forward and backward run over
chunks of ``chunk_size`` steps (``jax.lax.map``), so float32 temporaries are
``chunk_size * V`` elements whatever the batch. Math is float32 for any input dtype
(float64 for float64 logits); the gradient comes back in the logits' dtype.

Naive equivalent (what the tests compare against)::

    u = logits.astype(f32) / T
    masked = u_y - logsumexp(where(S, u, -inf))      # grad by autodiff

Example (``a`` from :func:`.sets.rollouts_to_arrays`)::

    logits = model(a.input_ids, a.attention_mask, a.position_ids)
    p = a.prompt_length
    res = pruned_logprobs(logits[:, p - 1 : -1], a.tokens, a.safe_bitmap,
                          a.temperature, mask=a.loss_mask)
    ratio = jnp.exp(res.logprobs - a.engine_masked_logprobs)  # on res.mask
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from .rule import GREEDY_EPS, RuleArrays, compute_dtype, safe_mask
from .sets import bitmap_bytes, mask_to_bitmap, unpack_bitmap

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "Mode",
    "PrunedLogprobs",
    "bitmap_contains",
    "bitmap_sizes",
    "pruned_logprobs",
]

Mode = Literal["replay", "recompute"]

#: Elements of one chunk of logits (steps x V): 16 Mi, 64 MiB of float32 temporaries.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


class PrunedLogprobs(NamedTuple):
    """What :func:`pruned_logprobs` returns; every array is ``[B, T]``.

    Attributes:
        logprobs: ``log pi_S(y)``, differentiable; 0 where ``mask`` is False. float32
            (float64 for float64 inputs), as are the next two.
        full_logprobs: ``log p(y)``, differentiable; 0 outside the input mask.
        log_z: trainer ``log Z_S`` (differentiable too); 0 outside the input mask.
        safe_sizes: int32 ``|S|`` of the sets used (S' in recompute mode); 0 off-mask.
        mask: bool, the steps that count: the input mask minus (recompute) the steps
            whose y is not in S'.
        set_disagreement: int32 ``|S xor S'|`` (recompute mode with engine sets), else None.
        y_not_in_set: bool, y not in S' (recompute mode), else None.
    """

    logprobs: Array
    full_logprobs: Array
    log_z: Array
    safe_sizes: Array
    mask: Array
    set_disagreement: Array | None = None
    y_not_in_set: Array | None = None


def bitmap_contains(bitmap: Array, tokens: Array) -> Array:
    """Whether ``tokens`` ``(...)`` are in the sets of ``bitmap`` ``(..., ceil(V / 8))``."""
    y = tokens.astype(jnp.int32)
    byte = jnp.take_along_axis(bitmap, (y >> 3)[..., None], axis=-1)[..., 0]
    return ((byte >> (y & 7).astype(jnp.uint8)) & 1).astype(bool)


def bitmap_sizes(bitmap: Array) -> Array:
    """``|S|`` per step, int32 ``(...)``, from a bitmap ``(..., ceil(V / 8))``."""
    return jnp.sum(jax.lax.population_count(bitmap).astype(jnp.int32), axis=-1)


#: Below this ``Z_S`` (relative to the row maximum's term) the one-exp shortcut could
#: lose S's mass to float32 underflow: the chunk is recomputed with S's own maximum.
_TINY_MASS = 1e-30


def _normalisers(u: Array, in_s: Array, valid: Array) -> tuple[Array, Array]:
    """``(logsumexp_V u, logsumexp_S u)`` per row ``(n,)``; an empty S gives -inf.

    One ``exp`` per element: both sums use the row maximum ``m``. The trainer's argmax
    need not be in the engine's S; when a valid row's ``sum_S exp(u - m)`` is below
    ``_TINY_MASS`` the chunk's ``logsumexp_S`` is recomputed with S's own maximum
    (``lax.cond``: the second pass runs only then).
    """
    m = jnp.max(u, axis=-1, keepdims=True)
    e = jnp.exp(u - m)
    lse_v = m[:, 0] + jnp.log(jnp.sum(e, axis=-1))
    s_s = jnp.sum(jnp.where(in_s, e, 0.0), axis=-1)

    def exact() -> Array:
        us = jnp.where(in_s, u, -jnp.inf)
        ms = jnp.max(us, axis=-1, keepdims=True)
        ms = jnp.where(jnp.isfinite(ms), ms, 0.0)
        return ms[:, 0] + jnp.log(jnp.sum(jnp.exp(us - ms), axis=-1))

    def fast() -> Array:
        return m[:, 0] + jnp.log(s_s)

    return lse_v, jax.lax.cond(jnp.any(valid & (s_s < _TINY_MASS)), exact, fast)


def _fwd_rows(
    logits: Array, tokens: Array, bitmap: Array, valid: Array, inv_t: Array
) -> tuple[Array, ...]:
    """Forward on rows ``(n, V)``: ``(u_y, lse_V, lse_S)``, each ``(n,)``."""
    v = logits.shape[-1]
    u = logits.astype(compute_dtype(logits.dtype)) * inv_t  # fp32 upcast: module docstring
    lse_v, lse_s = _normalisers(u, unpack_bitmap(bitmap, v), valid)
    u_y = jnp.take_along_axis(u, tokens[:, None], axis=-1)[:, 0]
    return u_y, lse_v, lse_s


def _bwd_rows(
    logits: Array,
    tokens: Array,
    bitmap: Array,
    inv_t: Array,
    lse_v: Array,
    lse_s: Array,
    g_s: Array,
    g_f: Array,
    g_z: Array,
) -> Array:
    """Gradient of rows ``(n, V)`` from the cotangents ``(n,)`` (zero on invalid rows).

    With ``pi_S(k) = p(k) / Z_S`` on S::

        T dL/dz_k = (g_s + g_f) 1[k = y] - p(k) [(g_f + g_z) + 1[k in S] (g_s - g_z) / Z_S]

    one ``exp`` per element; a chunk with a valid row whose ``Z_S < _TINY_MASS`` (where
    ``p(k)`` on S could underflow) takes ``pi_S = exp(u - lse_S)`` directly.
    """
    v = logits.shape[-1]
    u = logits.astype(compute_dtype(logits.dtype)) * inv_t
    in_s = unpack_bitmap(bitmap, v)
    onehot = jnp.arange(v) == tokens[:, None]
    log_z = lse_s - lse_v  # (n,) <= 0
    g_sf = (g_s + g_f)[:, None]

    def fast() -> Array:
        p = jnp.exp(u - lse_v[:, None])
        inv_z = jnp.exp(jnp.minimum(-log_z, 80.0))  # rows past the cap take exact()
        coef = jnp.where(in_s, ((g_s - g_z) * inv_z)[:, None], 0.0)
        return g_sf * onehot - p * ((g_f + g_z)[:, None] + coef)

    def exact() -> Array:
        p = jnp.exp(u - lse_v[:, None])
        pi_s = jnp.where(in_s, jnp.exp(u - lse_s[:, None]), 0.0)
        return g_sf * onehot - (g_s - g_z)[:, None] * pi_s - (g_f + g_z)[:, None] * p

    tiny = jnp.any(((g_s != 0) | (g_z != 0)) & (log_z < jnp.log(_TINY_MASS)))
    return (jax.lax.cond(tiny, exact, fast) * inv_t).astype(logits.dtype)


def _map(fn, xs: tuple[Array, ...], chunk: int):  # type: ignore[no-untyped-def]
    """``fn`` over rows of ``xs`` in chunks of ``chunk`` rows; one call when it all fits.

    A ``fori_loop`` slices the inputs in place (``dynamic_slice``) and writes each
    chunk's outputs into full-size buffers; when ``chunk`` does not divide the rows the
    last chunk overlaps the one before (its rows are computed twice, same values), so
    nothing is padded or copied.
    """
    n = xs[0].shape[0]
    if chunk >= n:
        return fn(*xs)
    k = -(-n // chunk)
    parts = [jax.ShapeDtypeStruct((chunk, *x.shape[1:]), x.dtype) for x in xs]
    shapes = jax.eval_shape(fn, *parts)
    init = jax.tree.map(lambda o: jnp.zeros((n, *o.shape[1:]), o.dtype), shapes)

    def body(i, acc):  # type: ignore[no-untyped-def]
        start = jnp.minimum(i * chunk, n - chunk)
        part = fn(*(jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=0) for x in xs))
        return jax.tree.map(
            lambda a, o: jax.lax.dynamic_update_slice_in_dim(a, o, start, axis=0), acc, part
        )

    return jax.lax.fori_loop(0, k, body, init)


@jax.custom_vjp
def _rows_logprobs(
    logits: Array, tokens: Array, bitmap: Array, valid: Array, inv_t: Array, chunk: Array
) -> tuple[Array, Array, Array]:
    return _rows_fwd(logits, tokens, bitmap, valid, inv_t, chunk)[0]


def _rows_fwd(logits, tokens, bitmap, valid, inv_t, chunk):  # type: ignore[no-untyped-def]
    n_chunk = chunk.shape[0]  # static: the chunk size travels as an array's shape
    u_y, lse_v, lse_s = _map(
        lambda lg, y, bm, ok: _fwd_rows(lg, y, bm, ok, inv_t),
        (logits, tokens, bitmap, valid),
        n_chunk,
    )
    zero = jnp.zeros_like(u_y)
    out = (
        jnp.where(valid, u_y - lse_s, zero),
        jnp.where(valid, u_y - lse_v, zero),
        jnp.where(valid, lse_s - lse_v, zero),
    )
    # Padding rows have empty sets (lse_S = -inf): use lse_V there, so that backward's
    # exp(u - lse) stays <= 1 on every row and 0 * inf never happens.
    safe_s = jnp.where(valid, lse_s, lse_v)
    return out, (logits, tokens, bitmap, valid, inv_t, chunk, lse_v, safe_s)


def _rows_bwd(res, cot):  # type: ignore[no-untyped-def]
    logits, tokens, bitmap, valid, inv_t, chunk, lse_v, lse_s = res
    g_s, g_f, g_z = (jnp.where(valid, c, 0.0) for c in cot)
    grad = _map(
        lambda lg, y, bm, lv, ls, a, b, c: _bwd_rows(lg, y, bm, inv_t, lv, ls, a, b, c),
        (logits, tokens, bitmap, lse_v, lse_s, g_s, g_f, g_z),
        chunk.shape[0],
    )
    return grad, None, None, None, jnp.zeros_like(inv_t), None


_rows_logprobs.defvjp(_rows_fwd, _rows_bwd)


def _is_concrete(*xs: object) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _check(
    logits: Array, tokens: Array, bitmap: Array | None, mask: Array | None
) -> tuple[int, int, int]:
    if logits.ndim != 3 or not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(
            f"logits must be float [B, T, V], got {logits.dtype} {tuple(logits.shape)}"
        )
    b, t, v = logits.shape
    if tokens.shape != (b, t) or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"tokens must be integer [B, T] = {[b, t]}, got {tokens.dtype} {list(tokens.shape)}"
        )
    if mask is not None and (mask.shape != (b, t) or mask.dtype != jnp.bool_):
        raise ValueError(f"mask must be bool {[b, t]}, got {mask.dtype} {list(mask.shape)}")
    if bitmap is not None and (
        bitmap.shape != (b, t, bitmap_bytes(v)) or bitmap.dtype != jnp.uint8
    ):
        raise ValueError(
            f"safe_bitmap must be uint8 {[b, t, bitmap_bytes(v)]}, "
            f"got {bitmap.dtype} {list(bitmap.shape)}"
        )
    return b, t, v


def _check_values(tokens: Array, bitmap: Array | None, valid: Array, v: int) -> None:
    """Eager calls only (skipped under jit): ids in range, y in its replayed set."""
    tok, ok = np.asarray(tokens), np.asarray(valid)
    bad = ok & ((tok < 0) | (tok >= v))
    if bad.any():
        i, s = np.argwhere(bad)[0]
        raise ValueError(f"token id {tok[i, s]} at batch {i}, step {s} is outside [0, {v})")
    if bitmap is not None:
        missing = ok & ~np.asarray(bitmap_contains(bitmap, jnp.clip(tokens, 0, v - 1)))
        if missing.any():
            i, s = np.argwhere(missing)[0]
            raise ValueError(
                f"sampled token {tok[i, s]} at batch {i}, step {s} is not in its safe set"
            )


def pruned_logprobs(
    logits: Array,
    tokens: Array,
    safe_bitmap: Array | None = None,
    temperature: float | Array = 1.0,
    *,
    mode: Mode = "replay",
    rule: RuleArrays | None = None,
    mask: Array | None = None,
    chunk_size: int | None = None,
) -> PrunedLogprobs:
    """Trainer-side ``log pi_S(y)`` for every step of a batch (module docstring).

    Args:
        logits: ``[B, T, V]`` float32 / bfloat16 / float16 / float64, predicting ``tokens``.
        tokens: integer ``[B, T]``, the sampled tokens y.
        safe_bitmap: uint8 ``[B, T, ceil(V / 8)]``, the engine's sets
            (:func:`.sets.rollouts_to_arrays`, or :func:`.sets.mask_to_bitmap` of a bool
            mask). Required in replay mode; in recompute mode only for ``set_disagreement``.
        temperature: T, a float or a scalar array (0 = greedy, scored at T = 1).
        mode: ``"replay"`` or ``"recompute"``.
        rule: recompute mode's rule (its temperature is replaced by ``temperature``).
        mask: bool ``[B, T]``, the steps to compute; others give 0 and no gradient.
        chunk_size: steps per chunk; default ``DEFAULT_CHUNK_ELEMENTS // V``.

    Returns:
        A :class:`PrunedLogprobs`.

    Raises:
        ValueError: shapes or dtypes that do not fit, a bad mode, replay without sets;
            on eager (not traced) inputs also a token outside the vocabulary or missing
            from its replayed set (the message gives batch b, step t).
    """
    b, t, v = _check(logits, tokens, safe_bitmap, mask)
    valid = jnp.ones((b, t), bool) if mask is None else mask
    tokens = jnp.where(valid, tokens, 0).astype(jnp.int32)
    if _is_concrete(tokens, safe_bitmap, valid):
        _check_values(tokens, safe_bitmap, valid, v)
    chunk = max(1, DEFAULT_CHUNK_ELEMENTS // v) if chunk_size is None else chunk_size
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk}")
    temp = jnp.asarray(temperature, dtype=compute_dtype(logits.dtype))
    inv_t = jnp.where(temp < GREEDY_EPS, 1.0, 1.0 / jnp.maximum(temp, GREEDY_EPS))
    disagreement = not_in = None
    if mode == "replay":
        if safe_bitmap is None:
            raise ValueError(
                "replay mode needs the engine's sets (safe_bitmap), or use mode='recompute'"
            )
        bitmap = safe_bitmap
    elif mode == "recompute":
        bitmap = _recompute(logits, temp, rule, chunk)
        not_in = valid & ~bitmap_contains(bitmap, tokens)
        if safe_bitmap is not None:
            xor = bitmap_sizes(jnp.bitwise_xor(bitmap, safe_bitmap))
            disagreement = jnp.where(valid, xor, 0)
    else:
        raise ValueError(f"mode must be 'replay' or 'recompute', got {mode!r}")
    in_set = valid if not_in is None else valid & ~not_in
    n = b * t
    masked, full, log_z = _rows_logprobs(
        logits.reshape(n, v),
        tokens.reshape(n),
        bitmap.reshape(n, -1),
        in_set.reshape(n),
        inv_t,
        jnp.zeros((min(chunk, n), 0), jnp.int8),
    )
    if not_in is not None:  # y not in S': log p(y) and log Z_S' still reported
        full_v, logz_v = _full_only(logits, tokens, bitmap, valid, inv_t, chunk)
        full, log_z = (
            jnp.where(not_in.reshape(n), full_v, full),
            jnp.where(not_in.reshape(n), logz_v, log_z),
        )
    return PrunedLogprobs(
        logprobs=masked.reshape(b, t),
        full_logprobs=full.reshape(b, t),
        log_z=log_z.reshape(b, t),
        safe_sizes=jnp.where(valid, bitmap_sizes(bitmap), 0),
        mask=in_set,
        set_disagreement=disagreement,
        y_not_in_set=not_in,
    )


def _full_only(
    logits: Array, tokens: Array, bitmap: Array, valid: Array, inv_t: Array, chunk: int
) -> tuple[Array, Array]:
    """``log p(y)`` and ``log Z_S`` (no gradient) for steps dropped in recompute mode."""
    b, t, v = logits.shape
    n = b * t
    _, full, log_z = _rows_logprobs(
        jax.lax.stop_gradient(logits).reshape(n, v),
        tokens.reshape(n),
        bitmap.reshape(n, -1),
        valid.reshape(n),
        inv_t,
        jnp.zeros((min(chunk, n), 0), jnp.int8),
    )
    return jax.lax.stop_gradient(full), jax.lax.stop_gradient(log_z)


def _recompute(logits: Array, temp: Array, rule: RuleArrays | None, chunk: int) -> Array:
    """S' by the rule, as a bitmap ``[B, T, ceil(V / 8)]`` (no gradient), chunk by chunk."""
    if rule is None:
        raise ValueError("recompute mode needs rule=")
    b, t, v = logits.shape
    n = b * t
    params = (
        jnp.broadcast_to(temp, (n,)),
        jnp.broadcast_to(jnp.asarray(rule.min_p, jnp.float32), (b, t)).reshape(n),
        jnp.broadcast_to(jnp.asarray(rule.top_k, jnp.int32), (b, t)).reshape(n),
        jnp.broadcast_to(jnp.asarray(rule.top_p, jnp.float32), (b, t)).reshape(n),
    )
    flat = jax.lax.stop_gradient(logits).reshape(n, v)

    def one(lg: Array, tt: Array, mp: Array, tk: Array, tp: Array) -> Array:
        return mask_to_bitmap(safe_mask(lg, RuleArrays(tt, mp, tk, tp)))

    out = _map(one, (flat, *params), chunk)
    return out.reshape(b, t, -1)
