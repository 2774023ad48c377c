"""PPO/GRPO policy loss on pruned log-probs, with rollout (behaviour) corrections.

Notation, per token t of rollout i (all ``[B, T]``; ``m`` the loss mask):

- ``logp``: the trainer's current ``log pi_S(y)`` (differentiable; from
  :func:`dvp_client.train.objective.pruned_logprobs`);
- ``old``: the trainer's ``log pi_S(y)`` under the weights the rollouts were
  sampled with (detached; default ``logp.detach()``, one update per batch);
- ``eng``: the engine's ``masked_logprob`` (the behaviour policy mu_S).

PPO ratio and clipped surrogate (Schulman et al. 2017, "Proximal Policy
Optimization Algorithms", arXiv:1707.06347; asymmetric clip ``eps_low`` /
``eps_high``, "clip-higher", from DAPO, Yu et al. 2025, arXiv:2503.14476)::

    r_t = exp(logp_t - old_t)
    L_t = -w_t * min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)

Behaviour correction ``w_t`` (detached) from the rollout ratio
``rho_t = exp(old_t - eng_t)``, trainer over engine; ``rho_seq = exp(sum_t m_t
(old_t - eng_t))``. A correction may also *reject* tokens (``keep_t = 0``):

=============  ===============================================  ==================
mode           w_t                                              keep_t
=============  ===============================================  ==================
none           1                                                m_t
token-tis      min(rho_t, C)                                    m_t
seq-tis        min(rho_seq, C)                                  m_t
token-mis      rho_t                                            m_t 1[rho_t <= C]
seq-mis        rho_seq                                          m_t 1[rho_seq <= C]
icepop         rho_t                                            m_t 1[a <= rho_t <= b]
=============  ===============================================  ==================

Sources: truncated IS (TIS), Yao et al. 2025, "Your Efficient RL Framework
Secretly Brings You Off-Policy RL Training" (fengyao.notion.site/off-policy-rl);
masked IS (MIS, token and sequence), Liu et al. 2025, "When Speed Kills
Stability: Demystifying RL Collapse from the Training-Inference Mismatch";
IcePop, Ling Team (inclusionAI) 2025, "Small Leak Can Sink a Great Ship: Boost
RL Training on MoE with IcePop" (band [a, b] = [0.5, 5] there). Rejected tokens
leave the denominators of the aggregation (as verl PR #3915 and slime PR #657
do for MIS); IcePop's paper writes ``1/|o_i|`` over all tokens instead.

Aggregation over kept tokens ``k = keep`` (names as in verl's ``agg_loss``)::

    token-mean          sum_{i,t} k L / sum_{i,t} k                   (DAPO)
    seq-mean-token-mean mean_i [ sum_t k L / sum_t k ]                (GRPO, Shao et al. 2024)
    seq-mean-token-sum  mean_i [ sum_t k L ]                          (Dr. GRPO, Liu et al. 2025)

where ``mean_i`` runs over rollouts with at least one kept token. With no kept
token at all the loss is 0 (and still part of the graph).

Stale tokens (async RL; :mod:`dvp_client.train.staleness`). With the per-token
versions ``v_t`` (sampling policy) and ``kv_t`` (oldest KV read) and the trainer at
version ``V``, ``behind_t = V - min(v_t, kv_t)``: a token whose context was read
through KV older than its sampling policy counts as that old. ``max_staleness = s``
drops the tokens with ``behind_t > s`` after the correction::

    keep_t <- keep_t 1[behind_t <= s]

so they get no gradient and leave the denominators like rejected tokens. The
correction itself is unchanged: ``rho_t`` (and ``rho_seq``, over the whole masked
rollout) still uses every token's engine log-prob.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .loss_options import Aggregation, Correction, LossOptions
from .staleness import stale_tokens, versions_behind, versions_given

__all__ = ["Aggregation", "Correction", "PolicyLossConfig", "PolicyLossOutput", "policy_loss"]


@dataclass(frozen=True)
class PolicyLossConfig(LossOptions):
    """Hyperparameters of :func:`policy_loss`, validated at construction: the options of
    :class:`~dvp_client.train.loss_options.LossOptions` (clip, correction, cap, IcePop
    band, aggregation; shared with the JAX loss) and:

    Attributes:
        max_staleness: drop tokens more than this many versions behind the trainer
            (module docstring); None keeps every token; >= 0 (0 keeps only tokens
            sampled by the trainer's version, over KV of that version when the KV
            versions are given).
    """

    max_staleness: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        s = self.max_staleness
        if s is not None and (isinstance(s, bool) or not isinstance(s, int)):
            raise ValueError(f"max_staleness must be an int or None, got {s!r}")
        if s is not None and s < 0:
            raise ValueError(f"max_staleness must be >= 0, got {s}")


@dataclass(frozen=True)
class PolicyLossOutput:
    """What :func:`policy_loss` returns.

    Attributes:
        loss: scalar, differentiable through ``logprobs``.
        per_token: ``L_t`` ``[B, T]`` (0 where not kept).
        ratio: detached PPO ratio ``r_t`` ``[B, T]``.
        weights: detached correction weights ``w_t`` ``[B, T]`` (0 where rejected).
        keep: bool ``[B, T]``, tokens that count after the correction's rejection
            and the staleness cut.
        mask: bool ``[B, T]``, the input loss mask.
        clipped: bool ``[B, T]``, kept tokens where the clipped surrogate was taken.
        stale: bool ``[B, T]``, masked-in tokens dropped for being more than
            ``max_staleness`` versions behind (all False without ``max_staleness``).
    """

    loss: Tensor
    per_token: Tensor
    ratio: Tensor
    weights: Tensor
    keep: Tensor
    mask: Tensor
    clipped: Tensor = field(repr=False)
    stale: Tensor = field(repr=False)

    def metrics(self, prefix: str = "policy/") -> dict[str, float]:
        """Floats for a logger: clip and kept fractions, mean ratio and weight, stale drops.

        ``stale_dropped`` is the number of masked-in tokens dropped by ``max_staleness``
        and ``stale_dropped_frac`` their share of the mask.
        """
        k = self.keep
        n = max(int(k.sum()), 1)
        return {
            f"{prefix}loss": float(self.loss.detach()),
            f"{prefix}clip_frac": float(self.clipped[k].sum()) / n,
            f"{prefix}kept_frac": int(k.sum()) / max(int(self.mask.sum()), 1),
            f"{prefix}ratio_mean": float(self.ratio[k].sum()) / n,
            f"{prefix}weight_mean": float(self.weights[k].sum()) / n,
            f"{prefix}weight_max": float(self.weights[k].max()) if bool(k.any()) else 0.0,
            f"{prefix}stale_dropped": float(self.stale.sum()),
            f"{prefix}stale_dropped_frac": int(self.stale.sum()) / max(int(self.mask.sum()), 1),
        }


# (log_rho [B, T] with 0 off-mask, mask, config) -> (w, keep)
CorrectionFn = Callable[[Tensor, Tensor, PolicyLossConfig], tuple[Tensor, Tensor]]


def _none(log_rho: Tensor, m: Tensor, c: PolicyLossConfig) -> tuple[Tensor, Tensor]:
    return torch.ones_like(log_rho), m


def _token_tis(log_rho: Tensor, m: Tensor, c: PolicyLossConfig) -> tuple[Tensor, Tensor]:
    return torch.exp(log_rho.clamp(max=math.log(c.cap))), m


def _seq_log_rho(log_rho: Tensor) -> Tensor:
    return log_rho.sum(-1, keepdim=True).expand_as(log_rho)  # (B, T), 0 off-mask already


def _seq_tis(log_rho: Tensor, m: Tensor, c: PolicyLossConfig) -> tuple[Tensor, Tensor]:
    return _token_tis(_seq_log_rho(log_rho), m, c)


def _token_mis(log_rho: Tensor, m: Tensor, c: PolicyLossConfig) -> tuple[Tensor, Tensor]:
    keep = m & (log_rho <= math.log(c.cap))
    return torch.where(keep, torch.exp(log_rho.clamp(max=math.log(c.cap))), 0.0), keep


def _seq_mis(log_rho: Tensor, m: Tensor, c: PolicyLossConfig) -> tuple[Tensor, Tensor]:
    return _token_mis(_seq_log_rho(log_rho), m, c)


def _icepop(log_rho: Tensor, m: Tensor, c: PolicyLossConfig) -> tuple[Tensor, Tensor]:
    keep = m & (log_rho >= math.log(c.icepop_low)) & (log_rho <= math.log(c.icepop_high))
    return torch.where(keep, torch.exp(log_rho.clamp(max=math.log(c.icepop_high))), 0.0), keep


CORRECTIONS: dict[Correction, CorrectionFn] = {
    Correction.NONE: _none,
    Correction.TOKEN_TIS: _token_tis,
    Correction.SEQ_TIS: _seq_tis,
    Correction.TOKEN_MIS: _token_mis,
    Correction.SEQ_MIS: _seq_mis,
    Correction.ICEPOP: _icepop,
}


def _token_mean(loss: Tensor, keep: Tensor) -> Tensor:
    return (loss * keep).sum() / keep.sum().clamp(min=1)


def _seq_mean(per_seq: Tensor, keep: Tensor) -> Tensor:
    has = keep.any(-1)  # (B,)
    return (per_seq * has).sum() / has.sum().clamp(min=1)


def _seq_mean_token_mean(loss: Tensor, keep: Tensor) -> Tensor:
    per_seq = (loss * keep).sum(-1) / keep.sum(-1).clamp(min=1)  # (B,)
    return _seq_mean(per_seq, keep)


def _seq_mean_token_sum(loss: Tensor, keep: Tensor) -> Tensor:
    return _seq_mean((loss * keep).sum(-1), keep)


AGGREGATIONS: dict[Aggregation, Callable[[Tensor, Tensor], Tensor]] = {
    Aggregation.TOKEN_MEAN: _token_mean,
    Aggregation.SEQ_MEAN_TOKEN_MEAN: _seq_mean_token_mean,
    Aggregation.SEQ_MEAN_TOKEN_SUM: _seq_mean_token_sum,
}


def policy_loss(
    logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    engine_logprobs: Tensor | None = None,
    config: PolicyLossConfig | None = None,
    token_policy_versions: Tensor | None = None,
    token_kv_versions: Tensor | None = None,
    trainer_version: int | None = None,
) -> PolicyLossOutput:
    """Clipped surrogate with a behaviour correction (formulas in the module docstring).

    Args:
        logprobs: ``[B, T]`` trainer ``log pi_S(y)``, differentiable.
        advantages: ``[B]`` (one per rollout, e.g. :func:`group_advantages`) or ``[B, T]``.
        mask: bool ``[B, T]``, the tokens that count (``PrunedLogprobs.mask``).
        old_logprobs: ``[B, T]`` trainer log-probs at sampling time; default
            ``logprobs.detach()`` (ratio 1: one update per batch).
        engine_logprobs: ``[B, T]`` engine ``masked_logprobs``; needed by every
            correction but ``none``.
        config: hyperparameters (default :class:`PolicyLossConfig`).
        token_policy_versions: int ``[B, T]``, the policy version that sampled each
            token; needed with ``config.max_staleness``.
        token_kv_versions: int ``[B, T]``, the oldest version whose KV each token's
            context read (``<=`` the policy version); None counts the policy version only.
        trainer_version: the version of the weights being trained; needed with the
            versions, and every masked-in token's versions must be ``<=`` it.

    Returns:
        A :class:`PolicyLossOutput`.

    Raises:
        ValueError: shapes that do not match, a correction without engine log-probs,
            ``max_staleness`` without versions, versions without ``trainer_version``,
            or a non-finite input or impossible version on a masked-in token (message
            gives batch b, step t).
    """
    cfg = config if config is not None else PolicyLossConfig()
    b, t = _check(logprobs, mask, advantages, old_logprobs, engine_logprobs)
    old = logprobs.detach() if old_logprobs is None else old_logprobs.detach()
    adv = advantages.unsqueeze(-1).expand(b, t) if advantages.dim() == 1 else advantages
    if cfg.correction is not Correction.NONE and engine_logprobs is None:
        raise ValueError(f"correction {cfg.correction.value!r} needs engine_logprobs")
    if engine_logprobs is None:
        log_rho = torch.zeros_like(old)
    else:
        log_rho = torch.where(mask, old - engine_logprobs.detach().to(old.dtype), 0.0)
    weights, keep = CORRECTIONS[cfg.correction](log_rho, mask, cfg)
    stale = _stale(mask, cfg, token_policy_versions, token_kv_versions, trainer_version)
    if cfg.max_staleness is not None:
        keep = keep & ~stale
    zero = torch.zeros_like(logprobs)
    ratio = torch.exp(torch.where(keep, logprobs - old, zero))
    adv = torch.where(keep, adv.to(ratio.dtype), 0.0)
    surr = ratio * adv
    surr_clip = ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high) * adv
    per_token = torch.where(keep, -weights * torch.minimum(surr, surr_clip), zero)
    loss = AGGREGATIONS[cfg.aggregation](per_token, keep)
    return PolicyLossOutput(
        loss=loss,
        per_token=per_token,
        ratio=ratio.detach(),
        weights=torch.where(keep, weights, 0.0).detach(),
        keep=keep,
        mask=mask,
        clipped=(surr_clip < surr).detach() & keep,
        stale=stale,
    )


def _stale(
    mask: Tensor,
    cfg: PolicyLossConfig,
    policy_versions: Tensor | None,
    kv_versions: Tensor | None,
    trainer_version: int | None,
) -> Tensor:
    """Masked-in tokens over ``cfg.max_staleness`` (all False without it); checks versions."""
    versions_given(policy_versions, trainer_version, kv_versions)  # all or none
    if policy_versions is None or trainer_version is None:
        if cfg.max_staleness is not None:
            raise ValueError(
                f"max_staleness={cfg.max_staleness} needs token_policy_versions and trainer_version"
            )
        return torch.zeros_like(mask)
    if cfg.max_staleness is None:
        versions_behind(mask, policy_versions, trainer_version, kv_versions)  # checks only
        return torch.zeros_like(mask)
    return stale_tokens(mask, cfg.max_staleness, policy_versions, trainer_version, kv_versions)


def _check(
    logprobs: Tensor,
    mask: Tensor,
    advantages: Tensor,
    old: Tensor | None,
    engine: Tensor | None,
) -> tuple[int, int]:
    """Validate shapes and finiteness on the mask; return ``(B, T)``."""
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got {list(logprobs.shape)}")
    b, t = logprobs.shape
    if mask.shape != (b, t) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool {[b, t]}, got {mask.dtype} {list(mask.shape)}")
    if advantages.shape not in ((b,), (b, t)):
        raise ValueError(f"advantages must be [{b}] or {[b, t]}, got {list(advantages.shape)}")
    named = [("logprobs", logprobs), ("old_logprobs", old), ("engine_logprobs", engine)]
    adv = advantages if advantages.dim() == 2 else advantages[:, None].expand(b, t)
    named.append(("advantages", adv))
    for name, x in named:
        if x is None:
            continue
        if x.shape != (b, t):
            raise ValueError(f"{name} must be {[b, t]}, got {list(x.shape)}")
        bad = ~torch.isfinite(x.detach()) & mask
        if bool(bad.any()):
            i, j = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"{name} is not finite at batch {i}, step {j}: {float(x[i, j])}")
    return b, t
