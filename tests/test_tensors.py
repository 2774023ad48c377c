"""RolloutBatch.to_torch: padded layout, CSR safe sets, replay of an engine's numbers,
bad responses, and an HTTP client that imports without torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from _dvp_batches import V, engine_response
from dvp_client.train.objective import pruned_logprobs
from dvp_client.train.tensors import SafeSets
from dvp_schemas import PruningRule


def test_layout_left_padded_prompts_right_padded_completions() -> None:
    batch, _ = engine_response(0, [3, 5, 1, 4], [4, 2, 6, 0])
    bt = batch.to_torch(pad_id=-7)
    assert bt.prompt_length == 5 and bt.tokens.shape == (4, 6) and bt.input_ids.shape == (4, 11)
    for i, r in enumerate(batch.rollouts):
        p, t = len(r.prompt_token_ids), len(r.token_ids)
        row = bt.input_ids[i].tolist()
        assert row[: 5 - p] == [-7] * (5 - p)
        assert row[5 - p : 5] == r.prompt_token_ids
        assert row[5 : 5 + t] == r.token_ids and row[5 + t :] == [-7] * (6 - t)
        assert bt.attention_mask[i].tolist() == [0] * (5 - p) + [1] * (p + t) + [0] * (6 - t)
        assert bt.position_ids[i, 5 - p : 5 + t].tolist() == list(range(p + t))
        assert bt.loss_mask[i].tolist() == [True] * t + [False] * (6 - t)
        np.testing.assert_allclose(bt.engine_masked_logprobs[i, :t], r.masked_logprobs, rtol=1e-6)
        np.testing.assert_allclose(bt.engine_logprobs[i, :t], r.logprobs, rtol=1e-6)
        assert bt.safe_sizes[i, :t].tolist() == r.safe_sizes
        assert bt.safe_sizes[i, t:].sum() == 0 and bt.engine_masked_logprobs[i, t:].abs().sum() == 0
    assert bt.group_ids.tolist() == [0, 0, 1, 1] and bt.sample_index.tolist() == [0, 1, 0, 1]
    assert bt.policy_version.tolist() == [3] * 4
    assert bt.temperature == 0.8 and bt.rule == PruningRule(min_p=0.05)
    assert bt.input_ids.dtype == bt.tokens.dtype == torch.int64 and bt.loss_mask.dtype == torch.bool


def test_safe_sets_csr_index_and_mask_agree_with_the_response() -> None:
    batch, _ = engine_response(1, [2, 2, 3], [5, 1, 3])
    bt = batch.to_torch()
    sets = bt.safe
    assert sets is not None and sets.shape == (3, 5) and sets.temperature == 0.8
    assert sets.rule == PruningRule(min_p=0.05)
    mask = sets.to_mask(V)
    rows, ids = sets.to_index()
    for i, r in enumerate(batch.rollouts):
        assert r.safe_token_ids is not None
        for t in range(5):
            want = r.safe_token_ids.step(t) if t < len(r.token_ids) else []
            assert mask[i, t].nonzero().squeeze(-1).tolist() == want
            assert ids[rows == i * 5 + t].tolist() == want
    assert torch.equal(sets.sizes(), bt.safe_sizes)
    back = SafeSets.from_mask(mask)
    assert back.offsets is not None and back.ids is not None
    assert torch.equal(back.offsets, sets.offsets) and torch.equal(back.ids, sets.ids)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replay_reproduces_the_engine_numbers(seed: int) -> None:
    """Trainer logits == engine logits: replayed log pi_S(y), log p(y) and log Z_S equal the
    engine's (so ratios are exactly 1 up to float32)."""
    batch, logits = engine_response(seed, [2, 4, 3, 1], [6, 3, 0, 5])
    bt = batch.to_torch()
    b, t = bt.tokens.shape
    # The trainer's model output for input_ids: [B, P + T, V]; place each rollout's logits.
    out = torch.randn(b, bt.prompt_length + t, V)
    for i, z in enumerate(logits):
        out[i, bt.prompt_length - 1 : bt.prompt_length - 1 + len(z)] = z
    comp = bt.completion_logits(out)
    assert comp.data_ptr() == out[:, bt.prompt_length - 1].data_ptr()  # a view, no copy
    res = pruned_logprobs(comp, bt.tokens, bt.safe, mask=bt.loss_mask)
    m = bt.loss_mask
    torch.testing.assert_close(res.logprobs[m], bt.engine_masked_logprobs[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(res.full_logprobs[m], bt.engine_logprobs[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(res.log_z[m], bt.engine_safe_logmass[m], atol=1e-5, rtol=0)
    # logits_to_keep = T + 1 gives the same view of the same numbers.
    short = out[:, bt.prompt_length - 1 :]
    assert torch.equal(bt.completion_logits(short), comp)


def test_sets_absent_full_or_none() -> None:
    b, _ = engine_response(2, [2], [3], rule=PruningRule(), with_ids=False)
    s = b.to_torch().safe
    assert s is not None and s.is_full and s.temperature == 0.8
    b, _ = engine_response(2, [2], [3], rule=PruningRule(min_p=0.1), with_ids=False)
    assert b.to_torch().safe is None  # pruned, ids not asked for: only recompute mode works
    b, _ = engine_response(2, [2], [3], rule=PruningRule(), with_ids=False, temperature=0.0)
    assert b.to_torch().safe is None  # greedy: S = {argmax}, not the vocabulary


def test_bad_responses_name_the_rollout_and_field() -> None:
    batch, _ = engine_response(3, [2, 2], [3, 4])
    bad = batch.model_copy(deep=True)
    bad.rollouts[1].masked_logprobs = bad.rollouts[1].masked_logprobs[:-1]
    with pytest.raises(
        ValueError, match=r"rollouts\[1\]\.masked_logprobs has 3 entries, token_ids has 4"
    ):
        bad.to_torch()
    bad = batch.model_copy(deep=True)
    bad.rollouts[0].logprobs = [0.0]
    with pytest.raises(ValueError, match=r"rollouts\[0\]\.logprobs has 1 entries, token_ids has 3"):
        bad.to_torch()
    bad = batch.model_copy(deep=True)
    bad.rollouts[1].safe_sizes = [
        *bad.rollouts[1].safe_sizes[:2],
        99,
        bad.rollouts[1].safe_sizes[3],
    ]
    with pytest.raises(
        ValueError, match=r"rollouts\[1\] step 2: safe_token_ids has \d+ ids, safe_sizes says 99"
    ):
        bad.to_torch()
    bad = batch.model_copy(deep=True)
    bad.rollouts[0].safe_token_ids = None
    with pytest.raises(ValueError, match=r"rollouts\[0\]\.safe_token_ids is missing"):
        bad.to_torch()
    bad = batch.model_copy(deep=True)
    bad.rollouts = []
    with pytest.raises(ValueError, match="response has no rollouts"):
        bad.to_torch()
    with pytest.raises(
        ValueError, match=r"logits have 4 positions; expected 6 \(prompt \+ completion\) or 5"
    ):
        batch.to_torch().completion_logits(torch.zeros(2, 4, V))


def test_null_logprobs_become_nan() -> None:
    batch, _ = engine_response(4, [2], [3])
    batch.rollouts[0].logprobs = [None, -1.0, None]
    batch.rollouts[0].safe_logmass = None
    bt = batch.to_torch()
    assert torch.isnan(bt.engine_logprobs[0, [0, 2]]).all() and bt.engine_logprobs[0, 1] == -1.0
    assert torch.isnan(bt.engine_safe_logmass).all()


def test_http_client_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import dvp_client\n"
        "from dvp_client import Client, RolloutBatch\n"
        "assert 'pruned_logprobs' in dir(dvp_client)\n"
        "try:\n"
        "    dvp_client.pruned_logprobs\n"
        "except ImportError:\n"
        "    print('lazy')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "lazy"
