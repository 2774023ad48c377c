"""Rollout responses built the way an engine fills them, from random logits (test helper)."""

from __future__ import annotations

import torch
from dvp_client import RolloutBatch
from dvp_client.train.rule import safe_vocab
from dvp_schemas import PruningRule

V = 40


def engine_response(
    seed: int,
    prompt_lens: list[int],
    comp_lens: list[int],
    *,
    temperature: float = 0.8,
    rule: PruningRule | None = None,
    with_ids: bool = True,
) -> tuple[RolloutBatch, list[torch.Tensor]]:
    """A response whose per-step fields come from the rule applied to random logits, as an
    engine would fill them; also returns each rollout's logits ``[T_i, V]``."""
    rule = rule or PruningRule(min_p=0.05)
    g = torch.Generator().manual_seed(seed)
    rollouts, all_logits = [], []
    for i, (p, t) in enumerate(zip(prompt_lens, comp_lens, strict=True)):
        z = torch.randn(t, V, generator=g) * 3
        sv = safe_vocab(
            z, temperature=temperature, min_p=rule.min_p, top_k=rule.top_k, top_p=rule.top_p
        )
        y = (
            torch.multinomial(sv.mask.float(), 1, generator=g).squeeze(-1)
            if t
            else torch.zeros(0, dtype=torch.long)
        )
        full, masked = sv.logprobs(y)
        _rows, ids = sv.mask.nonzero(as_tuple=True)
        offsets = [0, *torch.cumsum(sv.safe_sizes, 0).tolist()]
        rollouts.append(
            {
                "prompt_index": i // 2,
                "sample_index": i % 2,
                "prompt_token_ids": torch.randint(0, V, (p,), generator=g).tolist(),
                "token_ids": y.tolist(),
                "logprobs": full.tolist(),
                "masked_logprobs": masked.tolist(),
                "safe_logmass": sv.safe_logmass.tolist(),
                "safe_sizes": sv.safe_sizes.tolist(),
                "safe_token_ids": {"ids": ids.tolist(), "offsets": offsets} if with_ids else None,
                "finish_reason": "length",
                "policy_version": 3,
            }
        )
        all_logits.append(z)
    body = {
        "id": "r1",
        "model": "m",
        "engine": "torch",
        "temperature": temperature,
        "pruning": rule.model_dump(),
        "policy_version": 3,
        "rollouts": rollouts,
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }
    return RolloutBatch.model_validate(body), all_logits
