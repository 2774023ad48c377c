"""Pruned log-probs straight from the hidden states: an LM head that never builds the logits.

:func:`pruned_logprobs_from_hidden` gives what
:func:`dvp_client.train.objective.pruned_logprobs` gives for ``logits = hidden @ W^T``
(replay and recompute modes, ``log pi_S(y)``, ``log p(y)``, ``log Z_S``, the same
checks and error messages), without a ``[B, T, V]`` tensor in forward or backward::

    u = (hidden @ W^T) / T                                 # never materialised whole
    log pi_S(y) = u_y - logsumexp_{k in S} u_k
    log p(y)    = u_y - logsumexp_{k in V} u_k

The logits are computed in tiles of at most ``tile_elements`` (steps x vocabulary
rows) with an online logsumexp, and recomputed tile by tile in backward (see
:mod:`dvp_client.train._fused` for the gradient). Extra memory is one tile, the fp32
``(V, H)`` weight gradient, ``(N, H)`` / ``(N,)`` per-step vectors and the sets, not
``B * T * V``. With CSR sets and ``with_full=False`` nothing dense runs at all: the
forward and backward read only the rows ``W[S]`` and ``W[y]`` of each step (exact:
``log pi_S(y)`` needs no other row). When only ``logprobs`` gets a gradient (the usual
loss; ``full_logprobs`` and ``log_z`` for metrics), backward is sparse too.

Math is float32 (float64 for float64 hidden states) for any input dtype, also under a
caller's ``torch.autocast`` (switched off inside); a bf16 / fp16 weight is upcast once
per forward and once per backward (a transient ``(V, H)`` float32 copy, the size of its
gradient). Gradients go to ``hidden`` and to the weight (returned in their dtypes). Not
handled: an LM-head bias, logit soft-capping or scaling (Gemma 2, Granite, ...): compute
the logits and use ``pruned_logprobs``.

Example (a transformers causal LM; ``t`` from ``RolloutBatch.to_torch``)::

    out = model.model(t.input_ids, attention_mask=t.attention_mask,
                      position_ids=t.position_ids)
    p = t.prompt_length
    hidden = out.last_hidden_state[:, p - 1 : p - 1 + t.tokens.shape[1]]
    res = pruned_logprobs_from_hidden(hidden, model.lm_head.weight, t.tokens, t.safe,
                                      mask=t.loss_mask)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from dvp_schemas import PruningRule
from torch import Tensor

from ._chunks import compute_dtype
from ._fused import DEFAULT_TILE_ELEMENTS, FusedSets, fused_pruned_logprobs
from ._plan import Mode, PrunedLogprobs, check_steps, plan_steps, pruned_result
from .rule import RuleParams
from .tensors import SafeSets

__all__ = ["DEFAULT_TILE_ELEMENTS", "pruned_logprobs_from_hidden"]


def pruned_logprobs_from_hidden(
    hidden: Tensor,
    lm_head_weight: Tensor,
    tokens: Tensor,
    safe: SafeSets | Tensor | None = None,
    temperature: float | None = None,
    *,
    mode: Mode = "replay",
    rule: PruningRule | RuleParams | None = None,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    tile_elements: int | None = None,
    with_full: bool = True,
) -> PrunedLogprobs:
    """``pruned_logprobs(hidden @ lm_head_weight^T, ...)`` without the logits.

    Args:
        hidden: ``[B, T, H]`` float32 / bfloat16 / float16 / float64, the final hidden
            states that predict ``tokens`` (after the final norm; a slice is fine).
        lm_head_weight: ``(V, H)``, the output embedding (tied or not), any float dtype.
        tokens: integer ``[B, T]``, the sampled tokens y.
        safe: the engine's sets (:class:`SafeSets` or a bool ``[B, T, V]`` mask), as for
            ``pruned_logprobs``.
        temperature: T (0 = greedy, scored at T = 1); None takes it from ``safe``.
        mode: ``"replay"`` or ``"recompute"`` (S' by the rule from the trainer's logits,
            computed ``chunk_size`` steps at a time without gradient).
        rule: recompute mode's rule; defaults to ``safe.rule``.
        mask: bool ``[B, T]``, the steps to compute; others give 0 and no gradient.
        chunk_size: steps per chunk of recompute mode's rule pass (``(chunk, V)`` logits);
            default ``DEFAULT_CHUNK_ELEMENTS // V``.
        tile_elements: elements of one logits tile (default 16 Mi: 64 MiB in float32).
        with_full: also ``log p(y)`` and ``log Z_S`` (one dense pass in forward).

    Returns:
        A :class:`~dvp_client.train.objective.PrunedLogprobs`; ``logprobs`` and
        ``full_logprobs`` are differentiable with respect to ``hidden`` and the weight.

    Raises:
        ValueError: the errors of ``pruned_logprobs``, and hidden / weight shapes or
            dtypes that do not fit together.
    """
    b, t, v = _check_hidden(hidden, lm_head_weight, tokens, safe, mask)
    tile = DEFAULT_TILE_ELEMENTS if tile_elements is None else tile_elements
    if tile < 1:
        raise ValueError(f"tile_elements must be >= 1, got {tile}")
    plan = plan_steps(
        _rule_logits(hidden, lm_head_weight),
        (b, t, v),
        hidden.device,
        tokens,
        safe,
        temperature,
        mode=mode,
        rule=rule,
        mask=mask,
        chunk_size=chunk_size,
    )
    sets = FusedSets.make(plan.sets, plan.valid)
    masked, full, log_z = fused_pruned_logprobs(
        hidden, lm_head_weight, plan.tokens, sets, plan.inv_t, plan.in_set, with_full, tile
    )
    return pruned_result(plan, masked, full, log_z, with_full, (b, t, v), hidden.device)


def _check_hidden(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    safe: SafeSets | Tensor | None,
    mask: Tensor | None,
) -> tuple[int, int, int]:
    """Validate shapes and dtypes; return ``(B, T, V)``."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"lm_head_weight must be (V, H), got shape {tuple(weight.shape)}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise ValueError(
            f"hidden and lm_head_weight must be float tensors, got {hidden.dtype}, {weight.dtype}"
        )
    b, t, h = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != h:
        raise ValueError(
            f"lm_head_weight must be (V, H) with H = {h} (hidden's last dim), "
            f"got {tuple(weight.shape)}"
        )
    if weight.device != hidden.device:
        raise ValueError(f"hidden is on {hidden.device}, lm_head_weight on {weight.device}")
    check_steps((b, t, v), tokens, safe, mask, "hidden")
    return b, t, v


def _rule_logits(hidden: Tensor, weight: Tensor) -> Callable[[int, int, int], Tensor]:
    """Logits of steps ``t0:t1`` of row b for recompute mode's rule (no gradient)."""
    cdt = compute_dtype(hidden.dtype)
    cache: list[Tensor] = []

    def logits(i: int, t0: int, t1: int) -> Tensor:
        if not cache:  # the weight in the compute dtype, once (a copy only if not already)
            cache.append(weight.detach().to(cdt))
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return hidden.detach()[i, t0:t1].to(cdt) @ cache[0].t()

    return logits
