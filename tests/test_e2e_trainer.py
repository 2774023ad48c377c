"""End to end, trainer side: rollouts from the real server (torch engine, tiny model),
the trainer recomputes logits with its own fp32 copy of the same weights, and the DVP
objective is computed, differentiated and measured.

Tolerance: replay-mode log-ratios ``log pi'_S(y) - masked_logprob`` are within
``RATIO_LOG_ATOL = 2e-4`` of 0 (ratios within 1 +- 2e-4). Both sides are float32 with
the same weights; the server decodes with a KV cache in its own batches, the trainer
runs one left-padded teacher-forced forward, so the logits differ only by float32
summation order (the same bound as tests/test_e2e_torch.py's TF_ATOL).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from dvp_client import Client, RolloutBatch
from dvp_client.train.advantages import group_advantages
from dvp_client.train.losses import PolicyLossConfig, policy_loss
from dvp_client.train.metrics import batch_metrics
from dvp_client.train.objective import pruned_logprobs
from dvp_client.train.tensors import RolloutTensors

RATIO_LOG_ATOL = 2e-4
TEMPERATURE = 0.9
PRUNING = {"min_p": 0.01}
PROMPTS: list[Any] = [
    "The capital of France is",
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    [{"role": "user", "content": "What is 7*8?"}],
]


@pytest.fixture(scope="module")
def batch(server: str) -> RolloutBatch:
    with Client(server, timeout=120, max_retries=0) as c:
        return c.rollouts(
            PROMPTS,
            n=2,
            temperature=TEMPERATURE,
            max_tokens=12,
            seed=7,
            pruning=PRUNING,
            return_safe_token_ids=True,
        )


@pytest.fixture(scope="module")
def trainer_model(tiny_model_dir: Path) -> Iterator[torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model.train()  # the trainer's copy; the tiny model has no dropout
    yield model


def forward(model: torch.nn.Module, bt: RolloutTensors) -> torch.Tensor:
    out = model(
        input_ids=bt.input_ids, attention_mask=bt.attention_mask, position_ids=bt.position_ids
    )
    return bt.completion_logits(out.logits)  # [B, T, V] view


def test_replay_ratios_are_one_and_the_loss_trains(
    batch: RolloutBatch, trainer_model: torch.nn.Module
) -> None:
    bt = batch.to_torch(pad_id=0)
    assert bt.safe is not None and bt.temperature == TEMPERATURE
    assert int(bt.loss_mask.sum()) > 20
    trainer_model.zero_grad()
    logits = forward(trainer_model, bt)
    res = pruned_logprobs(logits, bt.tokens, bt.safe, mask=bt.loss_mask)
    m = bt.loss_mask
    log_ratio = (res.logprobs - bt.engine_masked_logprobs)[m].detach()
    worst = float(log_ratio.abs().max())
    assert worst < RATIO_LOG_ATOL, f"max |log ratio| {worst:.2e}"
    full = (res.full_logprobs - bt.engine_logprobs)[m].detach()  # torch engine: exact at any T
    assert float(full.abs().max()) < RATIO_LOG_ATOL
    assert float((res.log_z - bt.engine_safe_logmass)[m].abs().max()) < RATIO_LOG_ATOL
    assert torch.equal(res.safe_sizes[m], bt.safe_sizes[m])

    rewards = torch.tensor([float(len(r.token_ids) % 3) for r in batch.rollouts])
    adv = group_advantages(rewards, bt.group_ids)
    cfg = PolicyLossConfig(correction="token-tis", eps_high=0.28, aggregation="seq-mean-token-mean")
    out = policy_loss(
        res.logprobs, adv, res.mask, engine_logprobs=bt.engine_masked_logprobs, config=cfg
    )
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in trainer_model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    if bool((adv != 0).any()):
        assert sum(float(g.abs().sum()) for g in grads) > 0
    weights = out.weights[out.keep]
    assert float((weights - 1).abs().max()) < 1e-3  # TIS is inert without mismatch

    metrics = batch_metrics(bt, res)
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["mismatch/k3_pruned"] < 1e-7 and metrics["dvp/frac_masked"] == 0.0
    assert metrics["mismatch/tokens"] == float(m.sum())


def test_recompute_agrees_with_the_engine_sets(
    batch: RolloutBatch, trainer_model: torch.nn.Module
) -> None:
    bt = batch.to_torch()
    with torch.no_grad():
        logits = forward(trainer_model, bt)
    res = pruned_logprobs(logits, bt.tokens, bt.safe, mode="recompute", mask=bt.loss_mask)
    assert res.set_disagreement is not None and res.y_not_in_set is not None
    m = bt.loss_mask
    # S' from fp32 logits equals the engine's S except, at most, a token sitting within
    # float32 rounding of the min-p threshold.
    assert float((res.set_disagreement[m] > 0).float().mean()) <= 0.02
    assert not bool(res.y_not_in_set.any())
    keep = m & (res.set_disagreement == 0)
    diff = (res.logprobs - bt.engine_masked_logprobs)[keep]
    assert float(diff.abs().max()) < RATIO_LOG_ATOL


def test_a_bf16_trainer_shows_a_larger_mismatch(
    batch: RolloutBatch, trainer_model: torch.nn.Module
) -> None:
    """The metrics see precision mismatch: a bf16 copy of the weights moves k3 and |dlogp|."""
    bt = batch.to_torch()
    bf16 = copy.deepcopy(trainer_model).to(torch.bfloat16)
    with torch.no_grad():
        fp32 = pruned_logprobs(forward(trainer_model, bt), bt.tokens, bt.safe, mask=bt.loss_mask)
        low = pruned_logprobs(forward(bf16, bt), bt.tokens, bt.safe, mask=bt.loss_mask)
    m32, m16 = batch_metrics(bt, fp32), batch_metrics(bt, low)
    assert m16["mismatch/abs_dlogp_mean_pruned"] > 10 * m32["mismatch/abs_dlogp_mean_pruned"]
    assert m16["mismatch/k3_pruned"] > m32["mismatch/k3_pruned"]
    assert math.isfinite(m16["is_weight/q0.99"])


def test_temperature_mismatch_with_the_rollouts_is_refused(
    batch: RolloutBatch, trainer_model: torch.nn.Module
) -> None:
    bt = batch.to_torch()
    z = torch.zeros(*bt.tokens.shape, 49152)
    with pytest.raises(
        ValueError, match=r"temperature 1.0 does not match the rollouts' temperature 0.9"
    ):
        pruned_logprobs(z, bt.tokens, bt.safe, 1.0, mask=bt.loss_mask)
