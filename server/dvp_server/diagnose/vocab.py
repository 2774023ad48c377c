"""Whole-vocabulary comparison for ``dvp-diagnose``: fp32 trainer vs an engine-dtype copy.

A rollout response carries log-probs of the sampled tokens only, so the error
over the whole vocabulary cannot come from the server. Instead, at a random
subset of generated positions, the trainer's fp32 logits are compared with the
logits of a local copy of the same weights in the engine's dtype (e.g. bf16),
teacher-forced on the same tokens. That copy decodes without the server's KV
cache and batching, so it is a proxy of the engine's error; :func:`compare_vocab`
reports how close the proxy is on the sampled tokens of the same rollouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from dvp_client import RolloutBatch
from dvp_client.train.objective import pruned_logprobs
from dvp_client.train.tensors import RolloutTensors, SafeSets
from torch import Tensor

from .sample import Reference, completion_logits
from .stats import logit_eps

__all__ = ["VocabComparison", "compare_vocab", "pick_positions"]


@dataclass(frozen=True)
class VocabComparison:
    """Whole-vocabulary log-probs at ``K`` positions, and the proxy check.

    Attributes:
        trainer_logp: float32 ``[K, V]``, fp32 model, ``log_softmax(z / T)``.
        engine_logp: float32 ``[K, V]``, engine-dtype copy (logits upcast to float32
            before the softmax).
        eps: float32 ``[K]``, per-position ``min_c |delta - c|_inf`` (:func:`logit_eps`).
        proxy_abs_dlogp_local: mean ``|log p(y)|`` error of the local engine-dtype copy
            against fp32, on every sampled token of the rows that hold the positions.
        proxy_abs_dlogp_server: the same for the server's ``logprobs`` on those tokens.
        proxy_tokens: how many tokens the two means are over.
    """

    trainer_logp: Tensor
    engine_logp: Tensor
    eps: Tensor
    proxy_abs_dlogp_local: float
    proxy_abs_dlogp_server: float
    proxy_tokens: int


def pick_positions(
    masks: Sequence[Tensor], count: int, seed: int
) -> dict[int, list[tuple[int, int]]]:
    """``count`` generated steps drawn uniformly without replacement over all batches.

    Args:
        masks: each batch's bool ``[B_i, T_i]`` loss mask.
        count: positions to draw (fewer when there are fewer steps).
        seed: torch generator seed.

    Returns:
        ``{batch index: [(row, step), ...]}``.
    """
    steps = [(i, int(r), int(t)) for i, m in enumerate(masks) for r, t in m.nonzero().tolist()]
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(steps), generator=g)[: min(count, len(steps))]
    out: dict[int, list[tuple[int, int]]] = {}
    for j in sorted(chosen.tolist()):
        i, r, t = steps[j]
        out.setdefault(i, []).append((r, t))
    return out


def _full_logp(logits: Tensor, bt: RolloutTensors, rows: Tensor) -> Tensor:
    """``log p(y)`` of the sampled tokens of ``rows`` (0 off the mask), via pruned_logprobs."""
    tokens, mask = bt.tokens[rows], bt.loss_mask[rows]
    full = SafeSets.full(tuple(tokens.shape), temperature=bt.temperature)  # type: ignore[arg-type]
    res = pruned_logprobs(logits, tokens, full, mask=mask, with_full=True)
    assert res.full_logprobs is not None
    return res.full_logprobs


def compare_vocab(
    ref: Reference, batches: Sequence[RolloutBatch], count: int, seed: int
) -> VocabComparison:
    """Compare fp32 and engine-dtype log-probs over the whole vocabulary at random positions.

    Args:
        ref: the reference models.
        batches: unpruned rollouts (any rule works; the full distribution is compared).
        count: positions to compare.
        seed: draws the positions.

    Raises:
        ValueError: no generated step at all.
    """
    tensors = [b.to_torch(pad_id=0) for b in batches]
    picked = pick_positions([bt.loss_mask for bt in tensors], count, seed)
    if not picked:
        raise ValueError("no generated tokens to compare over the vocabulary")
    trainer, engine, eps = [], [], []
    err_local, err_server, n_tok = 0.0, 0.0, 0
    for i, pos in picked.items():
        bt = tensors[i]
        rows = torch.tensor(sorted({r for r, _ in pos}), dtype=torch.int64)
        local = {int(r): k for k, r in enumerate(rows)}
        z32 = completion_logits(ref.model, bt, rows).float()  # (b, T, V)
        zlo = completion_logits(ref.engine_copy(), bt, rows).float()  # upcast: bf16 rounding
        idx_r = torch.tensor([local[r] for r, _ in pos])
        idx_t = torch.tensor([t for _, t in pos])
        inv_t = 1.0 / bt.temperature
        trainer.append(torch.log_softmax(z32[idx_r, idx_t] * inv_t, -1))
        engine.append(torch.log_softmax(zlo[idx_r, idx_t] * inv_t, -1))
        eps.append(logit_eps(zlo[idx_r, idx_t], z32[idx_r, idx_t], bt.temperature))
        m = bt.loss_mask[rows]
        lp32, lplo = _full_logp(z32, bt, rows), _full_logp(zlo, bt, rows)
        server = bt.engine_logprobs[rows]
        ok = m & torch.isfinite(server)
        err_local += float((lplo - lp32)[ok].abs().double().sum())
        err_server += float((server - lp32)[ok].abs().double().sum())
        n_tok += int(ok.sum())
    return VocabComparison(
        trainer_logp=torch.cat(trainer),
        engine_logp=torch.cat(engine),
        eps=torch.cat(eps),
        proxy_abs_dlogp_local=err_local / max(n_tok, 1),
        proxy_abs_dlogp_server=err_server / max(n_tok, 1),
        proxy_tokens=n_tok,
    )
