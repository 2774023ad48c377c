"""Pruned log-probs on the trainer side: log pi_S(y) from the trainer's own logits.

For rollouts sampled by the engine from ``pi_S`` (see :mod:`dvp_client.train.rule`),
the trainer recomputes, per generated step with its own logits ``z'``:

- ``mode="replay"`` (default): S is the engine's set, replayed::

      log pi'_S(y) = z'_y / T - logsumexp_{v in S} z'_v / T

- ``mode="recompute"``: S' is built from ``z'`` by the same rule
  (:func:`dvp_client.train.rule.safe_mask`); steps where ``y`` is not in S' are masked
  out, and ``|S xor S'|`` is reported per step when the engine's sets are given.

Both modes also return the full ``log p'(y)`` and the trainer's ``log Z_S``.
Computation is float32 (float64 for float64 logits) whatever the logits' dtype,
chunked over the sequence, with an analytic backward (:mod:`dvp_client.train._chunks`):
``d log pi_S(y) / d z_k = (1[k = y] - pi_S(k) 1[k in S]) / T``.

Example::

    bt = batch.to_torch(device="cuda", pad_id=tok.pad_token_id)
    logits = model(bt.input_ids, attention_mask=bt.attention_mask,
                   position_ids=bt.position_ids).logits
    res = pruned_logprobs(bt.completion_logits(logits), bt.tokens, bt.safe,
                          bt.temperature, mask=bt.loss_mask)
    ratio = torch.exp(res.logprobs - bt.engine_masked_logprobs)  # on res.mask
"""

from __future__ import annotations

from dvp_schemas import PruningRule
from torch import Tensor

from ._chunks import pruned_logprob_function
from ._plan import (
    DEFAULT_CHUNK_ELEMENTS,
    Mode,
    PrunedLogprobs,
    check_steps,
    plan_steps,
    pruned_result,
)
from .rule import RuleParams
from .tensors import SafeSets

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "Mode", "PrunedLogprobs", "pruned_logprobs"]


def pruned_logprobs(
    logits: Tensor,
    tokens: Tensor,
    safe: SafeSets | Tensor | None = None,
    temperature: float | None = None,
    *,
    mode: Mode = "replay",
    rule: PruningRule | RuleParams | None = None,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    with_full: bool = True,
) -> PrunedLogprobs:
    """Trainer-side ``log pi_S(y)`` for every step of a batch (see the module docstring).

    Args:
        logits: ``[B, T, V]`` float32 / bfloat16 / float16 / float64; the logits that
            predict ``tokens`` (a view such as ``RolloutTensors.completion_logits`` is fine).
        tokens: integer ``[B, T]``, the sampled tokens y.
        safe: the engine's sets: :class:`SafeSets` (from ``to_torch``) or a bool
            ``[B, T, V]`` mask. Required in replay mode; optional in recompute mode
            (then only used for ``set_disagreement``).
        temperature: the sampling temperature T (0 = greedy, scored at T = 1). None
            takes the rollouts' temperature from ``safe``; a value that differs from it
            is an error.
        mode: ``"replay"`` or ``"recompute"``.
        rule: recompute mode's rule; defaults to ``safe.rule``. A :class:`RuleParams`
            must have ``B * T`` rows (step ``(b, t)`` is row ``b * T + t``).
        mask: bool ``[B, T]``, the steps to compute (e.g. ``loss_mask``); others give 0
            and no gradient and are not checked. Default: all steps.
        chunk_size: steps per chunk; default ``DEFAULT_CHUNK_ELEMENTS // V``.
        with_full: also compute ``log p(y)`` and ``log Z_S``. They need one dense pass
            over the logits (max, exp, sum); without them, CSR sets make the forward
            sparse (it touches only the ``|S|`` logits of each step) and
            ``full_logprobs`` / ``log_z`` are None.

    Returns:
        A :class:`PrunedLogprobs`.

    Raises:
        ValueError: mismatched shapes, a token outside ``[0, V)``, a safe-set id outside
            the vocabulary, a sampled token missing from its replayed set, or a
            temperature that differs from the rollouts' (messages give batch b, step t).
    """
    b, t, v = _check_shapes(logits, tokens, safe, mask)
    plan = plan_steps(
        lambda i, t0, t1: logits[i, t0:t1],
        (b, t, v),
        logits.device,
        tokens,
        safe,
        temperature,
        mode=mode,
        rule=rule,
        mask=mask,
        chunk_size=chunk_size,
    )
    masked, full, log_z = pruned_logprob_function(
        logits, plan.tokens, plan.sets, plan.inv_t, plan.valid, plan.in_set, plan.chunk, with_full
    )
    return pruned_result(plan, masked, full, log_z, with_full, (b, t, v), logits.device)


def _check_shapes(
    logits: Tensor, tokens: Tensor, safe: SafeSets | Tensor | None, mask: Tensor | None
) -> tuple[int, int, int]:
    """Validate shapes and dtypes; return ``(B, T, V)``."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    b, t, v = logits.shape
    check_steps((b, t, v), tokens, safe, mask, "logits")
    return b, t, v
