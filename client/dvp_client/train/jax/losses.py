"""PPO/GRPO policy loss on pruned log-probs in JAX, with the rollout corrections.

The same loss as :mod:`dvp_client.train.losses` (docs/protocol.md, section 5), as a
pure function of arrays (``jit``- and ``grad``-able). Per token t of rollout i
(``[B, T]``; ``m`` the loss mask), ``logp`` the trainer's ``log pi_S(y)``, ``old`` its
value at sampling time (``stop_gradient(logp)`` by default), ``eng`` the engine's
``masked_logprobs``::

    r_t       = exp(logp_t - old_t)
    L_t       = -w_t * min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)
    log rho_t = old_t - eng_t,   rho_seq = exp(sum_t m_t log rho_t)

=============  ==================  ======================
correction     w_t                 keep_t
=============  ==================  ======================
none           1                   m_t
token-tis      min(rho_t, C)       m_t
seq-tis        min(rho_seq, C)     m_t
token-mis      rho_t               m_t 1[rho_t <= C]
seq-mis        rho_seq             m_t 1[rho_seq <= C]
icepop         rho_t               m_t 1[a <= rho_t <= b]
=============  ==================  ======================

Aggregation over kept tokens k: ``token-mean`` ``sum k L / max(1, sum k)`` (DAPO),
``seq-mean-token-mean`` (GRPO) and ``seq-mean-token-sum`` (Dr. GRPO): means over the
rollouts with a kept token. No kept token: loss 0. References: PPO, Schulman et al.
2017 (arXiv:1707.06347); clip-higher, DAPO (arXiv:2503.14476); TIS, Yao et al. 2025;
MIS, Liu et al. 2025; IcePop, Ling Team 2025 (full list in docs/protocol.md).
Math is float32 for float32 / bf16 / fp16 inputs (float64 for float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from ..loss_options import Aggregation, Correction, LossOptions
from .rule import compute_dtype

__all__ = ["Aggregation", "Correction", "PolicyLossConfig", "PolicyLossOutput", "policy_loss"]


@dataclass(frozen=True)
class PolicyLossConfig(LossOptions):
    """Hyperparameters of :func:`policy_loss`, validated at construction (hashable:
    pass it to ``jit`` as a static argument or close over it). The fields and their
    ranges are :class:`~dvp_client.train.loss_options.LossOptions`' (the torch loss's
    options but ``max_staleness``)."""


class PolicyLossOutput(NamedTuple):
    """What :func:`policy_loss` returns (a pytree: it can leave ``jit`` as ``aux``).

    Attributes:
        loss: scalar, differentiable through ``logprobs``.
        per_token: ``L_t`` ``[B, T]`` (0 where not kept).
        ratio: PPO ratio ``r_t`` ``[B, T]`` (no gradient).
        weights: correction weights ``w_t`` ``[B, T]`` (0 where rejected; no gradient).
        keep: bool ``[B, T]``, the tokens that count after the correction.
        clipped: bool ``[B, T]``, kept tokens whose clipped term was the minimum.
    """

    loss: Array
    per_token: Array
    ratio: Array
    weights: Array
    keep: Array
    clipped: Array

    def metrics(self, mask: Array, prefix: str = "policy/") -> dict[str, float]:
        """Floats for a logger (host side): clip, kept fraction, mean ratio and weight."""
        k = self.keep
        n = max(int(k.sum()), 1)
        return {
            f"{prefix}loss": float(self.loss),
            f"{prefix}clip_frac": float(jnp.sum(self.clipped & k)) / n,
            f"{prefix}kept_frac": int(k.sum()) / max(int(mask.sum()), 1),
            f"{prefix}ratio_mean": float(jnp.sum(jnp.where(k, self.ratio, 0.0))) / n,
            f"{prefix}weight_mean": float(jnp.sum(jnp.where(k, self.weights, 0.0))) / n,
            f"{prefix}weight_max": float(jnp.max(jnp.where(k, self.weights, 0.0))),
        }


Corr = Callable[[Array, Array, PolicyLossConfig], tuple[Array, Array]]


def _none(lr: Array, m: Array, c: PolicyLossConfig) -> tuple[Array, Array]:
    return jnp.ones_like(lr), m


def _token_tis(lr: Array, m: Array, c: PolicyLossConfig) -> tuple[Array, Array]:
    return jnp.exp(jnp.minimum(lr, math.log(c.cap))), m


def _seq(lr: Array) -> Array:
    return jnp.broadcast_to(jnp.sum(lr, axis=-1, keepdims=True), lr.shape)  # 0 off-mask


def _token_mis(lr: Array, m: Array, c: PolicyLossConfig) -> tuple[Array, Array]:
    keep = m & (lr <= math.log(c.cap))
    return jnp.where(keep, jnp.exp(jnp.minimum(lr, math.log(c.cap))), 0.0), keep


def _icepop(lr: Array, m: Array, c: PolicyLossConfig) -> tuple[Array, Array]:
    keep = m & (lr >= math.log(c.icepop_low)) & (lr <= math.log(c.icepop_high))
    return jnp.where(keep, jnp.exp(jnp.minimum(lr, math.log(c.icepop_high))), 0.0), keep


CORRECTIONS: dict[Correction, Corr] = {
    Correction.NONE: _none,
    Correction.TOKEN_TIS: _token_tis,
    Correction.SEQ_TIS: lambda lr, m, c: _token_tis(_seq(lr), m, c),
    Correction.TOKEN_MIS: _token_mis,
    Correction.SEQ_MIS: lambda lr, m, c: _token_mis(_seq(lr), m, c),
    Correction.ICEPOP: _icepop,
}


def _seq_mean(per_seq: Array, keep: Array) -> Array:
    has = jnp.any(keep, axis=-1)  # (B,)
    return jnp.sum(jnp.where(has, per_seq, 0.0)) / jnp.maximum(jnp.sum(has), 1)


AGGREGATIONS: dict[Aggregation, Callable[[Array, Array], Array]] = {
    Aggregation.TOKEN_MEAN: lambda loss, k: jnp.sum(loss) / jnp.maximum(jnp.sum(k), 1),
    Aggregation.SEQ_MEAN_TOKEN_MEAN: lambda loss, k: _seq_mean(
        jnp.sum(loss, -1) / jnp.maximum(jnp.sum(k, -1), 1), k
    ),
    Aggregation.SEQ_MEAN_TOKEN_SUM: lambda loss, k: _seq_mean(jnp.sum(loss, -1), k),
}


def policy_loss(
    logprobs: Array,
    advantages: Array,
    mask: Array,
    *,
    old_logprobs: Array | None = None,
    engine_logprobs: Array | None = None,
    config: PolicyLossConfig | None = None,
) -> PolicyLossOutput:
    """Clipped surrogate with a behaviour correction (formulas in the module docstring).

    Args:
        logprobs: ``[B, T]`` trainer ``log pi_S(y)``, differentiable.
        advantages: ``[B]`` (per rollout, e.g. :func:`.advantages.group_advantages`)
            or ``[B, T]``.
        mask: bool ``[B, T]``, the tokens that count (``PrunedLogprobs.mask``).
        old_logprobs: ``[B, T]`` at sampling time; default ``stop_gradient(logprobs)``.
        engine_logprobs: ``[B, T]`` engine ``masked_logprobs``; needed by every
            correction but ``none``.
        config: hyperparameters (default :class:`PolicyLossConfig`).

    Returns:
        A :class:`PolicyLossOutput`. Off-mask values of the inputs are ignored (they
        may be NaN or inf).

    Raises:
        ValueError: shapes that do not match, or a correction without engine log-probs.
    """
    cfg = PolicyLossConfig() if config is None else config
    if logprobs.ndim != 2:
        raise ValueError(f"logprobs must be [B, T], got {list(logprobs.shape)}")
    b, t = logprobs.shape
    if mask.shape != (b, t) or mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be bool {[b, t]}, got {mask.dtype} {list(mask.shape)}")
    if advantages.shape not in ((b,), (b, t)):
        raise ValueError(f"advantages must be [{b}] or {[b, t]}, got {list(advantages.shape)}")
    for name, x in (("old_logprobs", old_logprobs), ("engine_logprobs", engine_logprobs)):
        if x is not None and x.shape != (b, t):
            raise ValueError(f"{name} must be {[b, t]}, got {list(x.shape)}")
    if cfg.correction is not Correction.NONE and engine_logprobs is None:
        raise ValueError(f"correction {cfg.correction.value!r} needs engine_logprobs")
    cdt = compute_dtype(logprobs.dtype)
    logp = jnp.where(mask, logprobs.astype(cdt), 0.0)
    old = jax.lax.stop_gradient(logp if old_logprobs is None else old_logprobs.astype(cdt))
    old = jnp.where(mask, old, 0.0)
    if engine_logprobs is None:
        log_rho = jnp.zeros_like(old)
    else:
        eng = jax.lax.stop_gradient(engine_logprobs.astype(cdt))
        log_rho = jnp.where(mask, old - eng, 0.0)
    weights, keep = CORRECTIONS[cfg.correction](log_rho, mask, cfg)  # type: ignore[index]
    weights = jax.lax.stop_gradient(jnp.where(keep, weights, 0.0))
    adv = advantages[:, None] if advantages.ndim == 1 else advantages
    adv = jnp.where(keep, jnp.broadcast_to(adv, (b, t)).astype(cdt), 0.0)
    ratio = jnp.exp(jnp.where(keep, logp - old, 0.0))
    surr = ratio * adv
    surr_clip = jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high) * adv
    per_token = jnp.where(keep, -weights * jnp.minimum(surr, surr_clip), 0.0)
    loss = AGGREGATIONS[cfg.aggregation](per_token, keep)  # type: ignore[index]
    return PolicyLossOutput(
        loss=loss,
        per_token=per_token,
        ratio=jax.lax.stop_gradient(ratio),
        weights=weights,
        keep=keep,
        clipped=jax.lax.stop_gradient((surr_clip < surr) & keep),
    )
