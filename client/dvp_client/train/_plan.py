"""Planning the pruned log-prob computation: inputs checked, sets chosen, result built.

Shared by the two ways of computing log pi_S(y): from the logits
(:func:`dvp_client.train.objective.pruned_logprobs`) and from the hidden states and
the LM head (:func:`dvp_client.train.fused_head.pruned_logprobs_from_hidden`). Each
checks its steps (:func:`check_steps`), plans (:func:`plan_steps`: tokens, mask,
temperature, the replayed sets or, in recompute mode, S' built by the rule), runs
its own autograd function, and assembles the :class:`PrunedLogprobs`
(:func:`pruned_result`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from dvp_schemas import PruningRule
from torch import Tensor

from ._chunks import ChunkedSets, chunk_bounds
from .rule import RuleParams, safe_mask
from .tensors import SafeSets

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "ChunkLogits",
    "Mode",
    "Plan",
    "PrunedLogprobs",
    "check_steps",
    "plan_steps",
    "pruned_result",
]

Mode = Literal["replay", "recompute"]

# Elements of one chunk of logits (rows x V): 16 Mi -> 64 MiB of float32 temporaries in
# the dense passes (341 steps at V = 49152). Larger chunks mean fewer, larger ops: on a
# busy 2-core CPU each parallel op can wait for a descheduled OpenMP thread, and
# [4, 512, 49152] forward+backward took 1.41 s with 4 Mi-element chunks, 0.95 s with
# 16 Mi, 0.85 s with 32 Mi (naive: 1.50 s). The extra peak stayed at the gradient's
# size: the forward temporaries are gone before backward allocates it.
DEFAULT_CHUNK_ELEMENTS = 1 << 24

# |T - T_rollout| above this is a mismatch (the wire carries T as a JSON float).
_TEMPERATURE_ATOL = 1e-6


@dataclass(frozen=True)
class PrunedLogprobs:
    """What :func:`pruned_logprobs` returns; every tensor is ``[B, T]``.

    Attributes:
        logprobs: ``log pi_S(y)``, differentiable; 0 where ``mask`` is False. float32
            (float64 for float64 logits), as are the next two.
        full_logprobs: ``log p(y)`` over the whole vocabulary, differentiable;
            0 outside the input mask; None when called with ``with_full=False``.
        log_z: trainer ``log Z_S = logsumexp_S u - logsumexp_V u`` (no grad); None with
            ``with_full=False``.
        safe_sizes: int64 ``|S|`` of the sets used (S' in recompute mode).
        mask: bool, the steps that count: the input mask, minus (recompute) the
            steps whose token is not in S'.
        set_disagreement: int64 ``|S xor S'|`` (recompute mode with engine sets), else None.
        y_not_in_set: bool, True where y is not in S' (recompute mode), else None.
    """

    logprobs: Tensor
    full_logprobs: Tensor | None
    log_z: Tensor | None
    safe_sizes: Tensor
    mask: Tensor
    set_disagreement: Tensor | None = None
    y_not_in_set: Tensor | None = None


# (b, t0, t1) -> the (t1 - t0, V) logits of steps t0:t1 of batch row b
ChunkLogits = Callable[[int, int, int], Tensor]


@dataclass(frozen=True)
class Plan:
    """Checked inputs and the sets to use, shared by the logits and hidden-state paths."""

    tokens: Tensor  # int64 [B, T], 0 outside valid
    valid: Tensor  # bool [B, T], the steps to compute
    in_set: Tensor  # bool [B, T], valid minus (recompute) y not in S'
    sets: ChunkedSets
    inv_t: float
    chunk: int
    disagreement: Tensor | None
    not_in: Tensor | None


def plan_steps(
    chunk_logits: ChunkLogits,
    shape: tuple[int, int, int],
    device: torch.device,
    tokens: Tensor,
    safe: SafeSets | Tensor | None,
    temperature: float | None,
    *,
    mode: Mode,
    rule: PruningRule | RuleParams | None,
    mask: Tensor | None,
    chunk_size: int | None,
) -> Plan:
    """Validate tokens, temperature and sets; build S' in recompute mode (shapes checked)."""
    b, t, v = shape
    temp = _resolve_temperature(temperature, safe)
    valid = torch.ones(b, t, dtype=torch.bool, device=device) if mask is None else mask
    tokens = _check_tokens(tokens.long(), valid, v)
    chunk = chunk_size if chunk_size is not None else max(1, DEFAULT_CHUNK_ELEMENTS // v)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk}")
    inv_t = 1.0 if temp == 0 else 1.0 / temp
    replayed = _as_sets(safe, v)
    if replayed is not None:
        _check_contains(replayed, tokens, valid, b, t)
    if mode == "replay":
        if replayed is None:
            raise ValueError(
                "replay mode needs the engine's safe sets (request return_safe_token_ids=True, "
                "pass SafeSets.full(...) for an unpruned vocabulary, or use mode='recompute')"
            )
        sets, disagreement, not_in = replayed, None, None
    elif mode == "recompute":
        params = _resolve_rule(rule, safe, temp, b * t)
        sets, disagreement, not_in = _recompute(
            chunk_logits, shape, device, tokens, valid, params, replayed, chunk
        )
    else:
        raise ValueError(f"mode must be 'replay' or 'recompute', got {mode!r}")
    in_set = valid if not_in is None else valid & ~not_in
    return Plan(tokens, valid, in_set, sets, inv_t, chunk, disagreement, not_in)


def pruned_result(
    plan: Plan,
    masked: Tensor,
    full: Tensor,
    log_z: Tensor,
    with_full: bool,
    shape: tuple[int, int, int],
    device: torch.device,
) -> PrunedLogprobs:
    """Assemble a :class:`PrunedLogprobs` from the autograd function's outputs."""
    sizes = _sizes(plan.sets, *shape, device)
    return PrunedLogprobs(
        logprobs=masked,
        full_logprobs=full if with_full else None,
        log_z=log_z if with_full else None,
        safe_sizes=torch.where(plan.valid, sizes, 0),
        mask=plan.in_set,
        set_disagreement=plan.disagreement,
        y_not_in_set=plan.not_in,
    )


def check_steps(
    shape: tuple[int, int, int],
    tokens: Tensor,
    safe: SafeSets | Tensor | None,
    mask: Tensor | None,
    what: str,
) -> None:
    """Validate tokens, mask and sets against ``(B, T, V)`` (``what`` names its source)."""
    b, t, v = shape
    if tokens.shape != (b, t):
        raise ValueError(
            f"tokens must be [B, T] = {[b, t]} to match {what} {list(shape)}, "
            f"got {list(tokens.shape)}"
        )
    if tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
    if mask is not None and (mask.shape != (b, t) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be bool {[b, t]}, got {mask.dtype} {list(mask.shape)}")
    if isinstance(safe, SafeSets) and safe.shape != (b, t):
        raise ValueError(f"safe sets are for steps {list(safe.shape)}, {what} have {[b, t]}")
    if isinstance(safe, Tensor) and (safe.shape != (b, t, v) or safe.dtype != torch.bool):
        raise ValueError(
            f"a safe mask must be bool {[b, t, v]}, got {safe.dtype} {list(safe.shape)}"
        )


def _where(flat_index: int, t: int) -> str:
    return f"batch {flat_index // t}, step {flat_index % t}"


def _resolve_temperature(temperature: float | None, safe: SafeSets | Tensor | None) -> float:
    """The temperature to use: the argument, checked against the rollouts' one."""
    known = safe.temperature if isinstance(safe, SafeSets) else None
    if temperature is None:
        if known is None:
            raise ValueError("temperature is required (the safe sets do not carry one)")
        temperature = known
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if known is not None and abs(temperature - known) > _TEMPERATURE_ATOL:
        raise ValueError(
            f"temperature {temperature} does not match the rollouts' temperature {known}"
        )
    return float(temperature)


def _check_tokens(tokens: Tensor, valid: Tensor, v: int) -> Tensor:
    """Raise on ids outside ``[0, V)`` at valid steps; return tokens with 0 elsewhere."""
    bad = valid & ((tokens < 0) | (tokens >= v))
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise ValueError(
            f"token id {int(tokens.flatten()[i])} at {_where(i, tokens.shape[1])} "
            f"is outside the vocabulary [0, {v})"
        )
    return torch.where(valid, tokens, 0)


def _as_sets(safe: SafeSets | Tensor | None, v: int) -> ChunkedSets | None:
    """Wrap the user's sets, checking CSR ids against the vocabulary."""
    if safe is None:
        return None
    if isinstance(safe, Tensor):
        return ChunkedSets.from_mask(safe)
    if safe.ids is not None and safe.offsets is not None and safe.ids.numel() > 0:
        lo, hi = int(safe.ids.min()), int(safe.ids.max())
        if lo < 0 or hi >= v:
            bad = lo if lo < 0 else hi
            j = int(((safe.ids == bad).nonzero())[0])
            row = int(torch.searchsorted(safe.offsets, torch.tensor(j), right=True)) - 1
            raise ValueError(
                f"safe-set id {bad} at {_where(row, safe.shape[1])} is outside the "
                f"vocabulary [0, {v})"
            )
    return ChunkedSets.from_csr(safe)


def _check_contains(sets: ChunkedSets, tokens: Tensor, valid: Tensor, b: int, t: int) -> None:
    """Raise if a valid step's sampled token is missing from its replayed set."""
    if sets.is_sparse:
        inside = sets.contains_all(tokens)
    elif sets.dense is not None:
        inside = sets.dense.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    else:
        return
    missing = valid & ~inside
    if bool(missing.any()):
        i, s = (int(x) for x in missing.nonzero()[0])
        size = int(_sizes(sets, b, t, 0, tokens.device)[i, s])
        raise ValueError(
            f"sampled token {int(tokens[i, s])} at batch {i}, step {s} is not in its "
            f"safe set (size {size})"
        )


def _resolve_rule(
    rule: PruningRule | RuleParams | None, safe: SafeSets | Tensor | None, temp: float, n: int
) -> RuleParams:
    """Per-step rule parameters for recompute mode (``n = B * T`` rows)."""
    if rule is None:
        rule = safe.rule if isinstance(safe, SafeSets) else None
        if rule is None:
            raise ValueError("recompute mode needs rule= (the safe sets do not carry one)")
    if isinstance(rule, PruningRule):
        return RuleParams.make(
            n, temperature=temp, min_p=rule.min_p, top_k=rule.top_k, top_p=rule.top_p
        )
    if rule.temperature.shape != (n,):
        raise ValueError(f"rule must have B * T = {n} rows, got {tuple(rule.temperature.shape)}")
    if bool((rule.temperature != temp).any()):
        got = float(rule.temperature[rule.temperature != temp][0])
        raise ValueError(f"rule temperature {got} does not match temperature {temp}")
    return rule


def _recompute(
    chunk_logits: ChunkLogits,
    shape: tuple[int, int, int],
    device: torch.device,
    tokens: Tensor,
    valid: Tensor,
    params: RuleParams,
    replayed: ChunkedSets | None,
    chunk: int,
) -> tuple[ChunkedSets, Tensor | None, Tensor]:
    """S' from the trainer's logits by the rule: CSR sets, ``|S xor S'|``, y-not-in-S'."""
    b, t, v = shape
    dev = device
    if not _prunes(params):  # S' = V everywhere: no CSR of B * T * V ids
        xor_full = (
            None if replayed is None else torch.where(valid, v - _sizes(replayed, b, t, v, dev), 0)
        )
        return ChunkedSets(), xor_full, torch.zeros(b, t, dtype=torch.bool, device=dev)
    rows, cols = [], []
    not_in = torch.zeros(b, t, dtype=torch.bool, device=dev)
    xor = torch.zeros(b, t, dtype=torch.int64, device=dev) if replayed is not None else None
    with torch.no_grad():
        for i, t0, t1 in chunk_bounds(b, t, chunk):
            r0, r1 = i * t + t0, i * t + t1
            m = safe_mask(
                chunk_logits(i, t0, t1),
                temperature=params.temperature[r0:r1],
                min_p=params.min_p[r0:r1],
                top_k=params.top_k[r0:r1],
                top_p=params.top_p[r0:r1],
            )  # (n, V) bool
            m &= valid[i, t0:t1].unsqueeze(-1)
            not_in[i, t0:t1] = ~m.gather(-1, tokens[i, t0:t1].unsqueeze(-1)).squeeze(-1)
            if xor is not None and replayed is not None:
                ch = replayed.chunk(i, t0, t1, t)
                both = ch.intersection_sizes(m)
                xor[i, t0:t1] = ch.sizes(v, dev) + m.sum(-1) - 2 * both
            r, c = m.nonzero(as_tuple=True)
            rows.append(r + r0)
            cols.append(c)
    flat_rows = torch.cat(rows)
    offsets = torch.zeros(b * t + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(torch.bincount(flat_rows, minlength=b * t), 0)
    sets = SafeSets(shape=(b, t), offsets=offsets, ids=torch.cat(cols))
    not_in &= valid
    if xor is not None:
        xor = torch.where(valid, xor, 0)
    return ChunkedSets.from_csr(sets), xor, not_in


def _prunes(p: RuleParams) -> bool:
    """Whether the rule can drop a token at some step (greedy steps count as pruning)."""
    return bool(
        (p.temperature == 0).any() | (p.min_p > 0).any() | (p.top_k > 0).any() | (p.top_p < 1).any()
    )


def _sizes(sets: ChunkedSets, b: int, t: int, v: int, device: torch.device) -> Tensor:
    """``|S|`` per step, int64 ``[B, T]``."""
    if sets.dense is not None:  # per batch row: a bool sum makes an int64 copy of its input
        return torch.stack([row.sum(-1) for row in sets.dense])
    if sets.csr is not None:
        return sets.csr.sizes(v).to(device)
    return torch.full((b, t), v, dtype=torch.int64, device=device)
