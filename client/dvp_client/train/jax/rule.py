"""The safe-vocabulary rule in JAX (the same rule as :mod:`dvp_client.train.rule`).

For one decoding step with logits ``z`` (vocabulary V), temperature ``T`` and the
rule (``min_p`` = rho, ``top_k`` = k, ``top_p`` = q), in vLLM's sampler order
(docs/protocol.md, section 2):

1. ``u = z / T``; ``T < 1e-5`` is greedy: ``u = z`` and ``S = {argmax z}``.
2. min-p: keep v iff ``u_v - max(u) >= log(rho)`` (rho = 0 keeps all).
3. top-k: if k > 0, keep the kept v with ``u_v >= u_(k)``, the k-th largest kept
   value (ties with it are all kept).
4. top-p: if q < 1, order the kept tokens by ``u`` descending, renormalise, keep v
   iff the mass strictly before it is ``< q``; the first token always stays.

Pure functions of arrays, ``jit``-able with per-row parameters as traced arrays
(no value-dependent shapes: top-k and top-p sort the row once, ``O(V log V)``).
Math is float32 whatever the logits' dtype (float64 for float64 logits): a bf16
``log_softmax`` has a rounding floor of ~2e-3 for p > 0.99, larger than the
engine/trainer mismatch DVP is about. Ties at the top-p cut are broken by the
lower token id (the protocol allows any order).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

__all__ = ["GREEDY_EPS", "RuleArrays", "SafeVocab", "compute_dtype", "safe_mask", "safe_vocab"]

#: Temperatures below this are greedy (vLLM's ``_SAMPLING_EPS``).
GREEDY_EPS = 1e-5

ArrayLike = Array | float | int


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float64 for float64 inputs, float32 for every other float dtype (bf16, fp16, fp32)."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


class RuleArrays(NamedTuple):
    """Per-row rule parameters, each a scalar or shaped like the logits without V.

    Attributes:
        temperature: float; below ``GREEDY_EPS`` is greedy.
        min_p: float in [0, 1].
        top_k: int; 0 means no cap.
        top_p: float in (0, 1].
    """

    temperature: ArrayLike = 1.0
    min_p: ArrayLike = 0.0
    top_k: ArrayLike = 0
    top_p: ArrayLike = 1.0


class SafeVocab(NamedTuple):
    """The rule applied to logits ``(..., V)``.

    Attributes:
        scaled: ``u`` ``(..., V)`` in the compute dtype (``z`` on greedy rows).
        mask: bool ``(..., V)``, the safe sets S.
        log_z_full: ``logsumexp_V u``, ``(...)``.
        log_z_safe: ``logsumexp_S u``, ``(...)``.
    """

    scaled: Array
    mask: Array
    log_z_full: Array
    log_z_safe: Array

    @property
    def safe_logmass(self) -> Array:
        """``log Z_S = logsumexp_S u - logsumexp_V u`` (<= 0), ``(...)``."""
        return self.log_z_safe - self.log_z_full

    def logprobs(self, tokens: Array) -> tuple[Array, Array]:
        """``(log p(y), log pi_S(y))`` of integer ``tokens`` ``(...)``; the masked one is
        ``-inf`` where y is not in S."""
        y = tokens[..., None].astype(jnp.int32)
        u_y = jnp.take_along_axis(self.scaled, y, axis=-1)[..., 0]
        in_s = jnp.take_along_axis(self.mask, y, axis=-1)[..., 0]
        return u_y - self.log_z_full, jnp.where(in_s, u_y - self.log_z_safe, -jnp.inf)


def _col(x: ArrayLike, shape: tuple[int, ...], dtype: jnp.dtype) -> Array:
    """A parameter broadcast to the row shape, with a trailing axis for V: ``(..., 1)``."""
    return jnp.broadcast_to(jnp.asarray(x, dtype=dtype), shape)[..., None]


def scale(logits: Array, temperature: ArrayLike) -> tuple[Array, Array]:
    """Step 1: ``(u, greedy)``; u in the compute dtype ``(..., V)``, greedy bool ``(..., 1)``."""
    cdt = compute_dtype(logits.dtype)
    t = _col(temperature, logits.shape[:-1], cdt)
    greedy = t < GREEDY_EPS
    u = logits.astype(cdt) / jnp.where(greedy, 1.0, t)  # upcast first: see module docstring
    return u, greedy


def rule_mask(u: Array, greedy: Array, params: RuleArrays) -> Array:
    """Steps 2-4 on scaled logits ``u`` ``(..., V)``; returns bool ``(..., V)``."""
    rows, v = u.shape[:-1], u.shape[-1]
    u_max = jnp.max(u, axis=-1, keepdims=True)
    log_rho = jnp.log(_col(params.min_p, rows, u.dtype))  # log 0 = -inf keeps all
    mask = (u - u_max) >= log_rho
    # Sort the min-p survivors once, descending; -inf marks the dropped ones.
    masked_u = jnp.where(mask, u, -jnp.inf)
    order = jnp.argsort(-masked_u, axis=-1, stable=True)  # (..., V), ties: lower id first
    vals = jnp.take_along_axis(masked_u, order, axis=-1)
    # 3. top-k: keep values >= the k-th largest survivor (ties kept).
    k = _col(params.top_k, rows, jnp.int32)
    kth = jnp.take_along_axis(vals, jnp.clip(k - 1, 0, v - 1), axis=-1)  # (..., 1)
    mask = mask & ((k <= 0) | (u >= kth))
    # 4. top-p over the renormalised survivors of steps 2-3, in the same order.
    vals = jnp.where(jnp.take_along_axis(mask, order, axis=-1), vals, -jnp.inf)
    probs = jax.nn.softmax(vals, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
    q = _col(params.top_p, rows, u.dtype)
    keep_sorted = (before < q) | (jnp.arange(v) == 0)
    rank = jnp.argsort(order, axis=-1)  # inverse permutation
    mask = mask & ((q >= 1) | jnp.take_along_axis(keep_sorted, rank, axis=-1))
    argmax = jnp.arange(v) == jnp.argmax(u, axis=-1, keepdims=True)
    return jnp.where(greedy, argmax, mask)


def safe_vocab(logits: Array, params: RuleArrays | None = None) -> SafeVocab:
    """Apply the rule to logits ``(..., V)`` of any float dtype (see the module docstring).

    Args:
        logits: ``(..., V)`` raw logits.
        params: per-row parameters, scalars or shaped ``logits.shape[:-1]``.

    Returns:
        A :class:`SafeVocab` (no gradient flows through the mask).
    """
    p = RuleArrays() if params is None else params
    u, greedy = scale(logits, p.temperature)
    mask = rule_mask(jax.lax.stop_gradient(u), greedy, p)
    lse_full = jax.nn.logsumexp(u, axis=-1)
    lse_safe = jax.nn.logsumexp(jnp.where(mask, u, -jnp.inf), axis=-1)
    return SafeVocab(u, mask, lse_full, lse_safe)


def safe_mask(logits: Array, params: RuleArrays | None = None) -> Array:
    """The safe sets only: bool ``(..., V)`` for logits ``(..., V)``."""
    p = RuleArrays() if params is None else params
    u, greedy = scale(jax.lax.stop_gradient(logits), p.temperature)
    return rule_mask(u, greedy, p)
