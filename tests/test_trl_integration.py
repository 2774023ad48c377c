"""DVPGRPOTrainer (TRL's GRPOTrainer on dvp-serve) against a real server on the tiny model.

A torch-engine server with ``--weights-root`` serves the tiny model; TRL trains for
three steps, pushing weights before each generation. Checked: the trainer's pruned
log-prob (fused head over the engine's replayed sets) matches the engine's masked
log-prob on every token; ``policy_version`` goes up by one per step; the same run
without pushes does not match after its first update; and each step's loss equals
``policy_loss`` recomputed from the rollouts with a plain model, its full logits and
``pruned_logprobs`` (an independent path from the trainer's fused head).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("trl")

from _ops import own_server
from _trl_setup import STEPS, TOL, Recording, gaps, train
from conftest import ServerProcess
from dvp_client import Client
from dvp_client.train.losses import policy_loss
from dvp_client.train.objective import pruned_logprobs
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="module")
def weights_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, Path]]:
    root = tmp_path_factory.mktemp("trl-weights")
    with own_server(
        tiny_model_dir, tmp_path_factory.mktemp("trl-srv"), "--weights-root", str(root)
    ) as s:
        yield s, root


def plain_logprobs(tiny: Path, state: dict[str, torch.Tensor], t: Any) -> Any:
    """Pruned log-probs from a plain model's full logits (not the trainer's fused head)."""
    ref = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    ref.load_state_dict(state)
    with torch.no_grad():
        logits = ref(t.input_ids, attention_mask=t.attention_mask, position_ids=t.position_ids)
    return pruned_logprobs(t.completion_logits(logits.logits), t.tokens, t.safe, mask=t.loss_mask)


def recomputed_loss(
    tiny: Path,
    r: dict[str, Any],
    state: dict[str, torch.Tensor],
    trainer: Recording,
    old_state: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """policy_loss from a record's rollouts and advantages, log-probs by the plain path."""
    t = r["tensors"]
    lp = plain_logprobs(tiny, state, t)
    old = None
    if old_state is not None:
        old = plain_logprobs(tiny, old_state, t).logprobs
        n = old.shape[1]
        torch.testing.assert_close(r["old"][:, :n], old, atol=2e-5, rtol=0)
    return policy_loss(
        lp.logprobs,
        r["advantages"],
        lp.mask,
        old_logprobs=old,
        engine_logprobs=t.engine_masked_logprobs,
        config=trainer.dvp_loss_config,
    ).loss


@pytest.mark.slow  # a server and two 3-step TRL runs on the busy 2-core machine
def test_trl_grpo_steps_match_the_engine(
    weights_server: tuple[ServerProcess, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    server, root = weights_server
    v0 = int(Client(server.base_url).request("GET", "/v1/weights")["policy_version"])
    pushed = train(tiny_model_dir, server.base_url, root, tmp_path / "push", push=True)
    assert len(pushed.records) == STEPS
    assert pushed.policy_versions == [v0 + 1 + k for k in range(STEPS)]
    assert max(gaps(pushed)) < TOL, gaps(pushed)
    logged = [h for h in pushed.state.log_history if "dvp/policy_version" in h]
    assert [h["dvp/policy_version"] for h in logged] == pushed.policy_versions
    assert all("mismatch/k3_pruned" in h and "dvp/safe_size_mean" in h for h in logged)
    assert any(r["advantages"].abs().sum() > 0 for r in pushed.records)

    for r in pushed.records:  # the loss, recomputed from the rollouts by another path
        want = recomputed_loss(tiny_model_dir, r, r["state"], pushed)
        torch.testing.assert_close(r["loss"], want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["returned"], r["loss"], atol=0, rtol=0)
        t = r["tensors"]
        assert [x.token_ids for x in r["rows"]] == [
            row[m].tolist() for row, m in zip(t.tokens, t.loss_mask, strict=True)
        ]

    # num_iterations = 2: the second step reuses the batch against pruned old log-probs
    # taken before the first update, so its ratio (and loss) depends on the log-probs.
    twice = train(tiny_model_dir, server.base_url, root, tmp_path / "twice", True, 2, 2)
    first, second = twice.records
    assert twice.policy_versions == [twice.policy_versions[0]]  # one generation
    assert first["old"] is not None and second["old"] is not None
    want = recomputed_loss(tiny_model_dir, second, second["state"], twice, old_state=first["state"])
    torch.testing.assert_close(second["loss"], want, atol=1e-6, rtol=1e-5)
    assert abs(float(second["loss"])) > 1e-4  # ratios away from 1: a real check

    stale = train(tiny_model_dir, server.base_url, root, tmp_path / "stale", False, 2)
    g = gaps(stale)
    assert g[0] < TOL  # same weights on both sides before the first update
    assert min(g[1:]) > TOL, g  # the server still samples from the initial weights


def _llama(tied: bool) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg)


def test_tied_embeddings_are_written_once_under_the_input_name() -> None:
    from dvp_client.integrations._weights import checkpoint_tensors

    tied, untied = checkpoint_tensors(_llama(True)), checkpoint_tensors(_llama(False))
    assert "model.embed_tokens.weight" in tied and "lm_head.weight" not in tied
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(untied)
    assert len(untied) == len(tied) + 1


def test_adapters_loaded_into_a_plain_model_are_refused() -> None:
    from dvp_client.integrations._weights import check_pushable

    model = _llama(False)
    check_pushable(model)
    model._hf_peft_config_loaded = True  # what transformers sets after load_adapter()
    with pytest.raises(ValueError, match="adapters loaded into a transformers model"):
        check_pushable(model)
