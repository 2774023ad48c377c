"""The wire contract: strict requests, tolerant responses, messages that name the field."""

from __future__ import annotations

import json

import pytest
from dvp_schemas import PruningRule, Rollout, RolloutRequest, SafeTokenIds, SamplingOptions
from pydantic import ValidationError


def _loc(err: ValidationError) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in err.errors()]


def test_defaults_and_mixed_prompts() -> None:
    r = RolloutRequest(
        prompts=["hi", [1, 2, 3], [{"role": "user", "content": "x"}]],
        sampling={"stop": "END"},
    )
    assert r.n == 1 and r.sampling.temperature == 1.0 and r.sampling.stop == ["END"]
    assert not r.pruning.prunes
    assert r.prompts[1] == [1, 2, 3]
    assert r.prompts[2][0].role == "user"  # type: ignore[index,union-attr]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompts": ["a"], "bogus": 1}, "bogus"),
        ({"prompts": ["a"], "sampling": {"temp": 1}}, "sampling.temp"),
        ({"prompts": ["a"], "pruning": {"min_p": 1.5}}, "pruning.min_p"),
        ({"prompts": ["a"], "pruning": {"min_p": -0.1}}, "pruning.min_p"),
        ({"prompts": ["a"], "pruning": {"top_p": 0}}, "pruning.top_p"),
        ({"prompts": ["a"], "pruning": {"top_k": -1}}, "pruning.top_k"),
        ({"prompts": ["a"], "sampling": {"temperature": -1}}, "sampling.temperature"),
        ({"prompts": ["a"], "sampling": {"max_tokens": 0}}, "sampling.max_tokens"),
        ({"prompts": ["a"], "sampling": {"seed": -3}}, "sampling.seed"),
        ({"prompts": ["a"], "sampling": {"stop": [""]}}, "sampling.stop"),
        ({"prompts": ["a"], "n": 0}, "n"),
        ({"prompts": []}, "prompts"),
        ({"prompts": [""]}, "prompts"),
        ({"prompts": [[]]}, "prompts.0"),
    ],
)
def test_bad_requests_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as e:
        RolloutRequest.model_validate(body)
    assert any(loc == field or loc.startswith(field + ".") for loc in _loc(e.value)), _loc(e.value)


def test_nan_and_inf_are_rejected() -> None:
    body = json.loads('{"prompts": ["a"], "sampling": {"temperature": NaN}}')
    with pytest.raises(ValidationError) as e:
        RolloutRequest.model_validate(body)
    assert "sampling.temperature" in _loc(e.value)
    with pytest.raises(ValidationError):
        SamplingOptions(temperature=float("inf"))


def test_top_k_zero_means_no_cap() -> None:
    assert PruningRule(top_k=0).top_k is None
    assert PruningRule(top_k=5).prunes and PruningRule(min_p=1e-3).prunes


def test_responses_ignore_unknown_fields() -> None:
    r = Rollout.model_validate(
        {
            "prompt_index": 0,
            "sample_index": 0,
            "prompt_token_ids": [1],
            "token_ids": [5, 6],
            "masked_logprobs": [-0.1, -0.2],
            "safe_sizes": [3, 4],
            "finish_reason": "length",
            "policy_version": 0,
            "a_field_from_the_future": {"x": 1},
        }
    )
    assert r.num_tokens == 2


def test_csr_is_checked() -> None:
    s = SafeTokenIds(ids=[1, 2, 3, 9], offsets=[0, 3, 4])
    assert s.step(0) == [1, 2, 3] and s.step(1) == [9]
    for bad in ([1, 3, 4], [0, 3, 2, 4], [0, 3]):
        with pytest.raises(ValidationError):
            SafeTokenIds(ids=[1, 2, 3, 9], offsets=bad)
