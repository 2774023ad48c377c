"""The official ``openai`` client against ``/v1/completions`` and ``/v1/chat/completions``.

Against the real server (torch engine, tiny model). One sampling path: a
seeded OpenAI request returns the very rollouts ``/v1/rollouts`` returns for
the same prompts, n, seed and rule (compared exactly), dressed as OpenAI
choices with the DVP fields in ``choice.model_extra["dvp"]``. Top-k
alternatives come from teacher forcing: the sampled token's entry among them
matches its sampling-time log-prob within ``TOP_ATOL = 1e-5`` (see
tests/test_score.py for that tolerance).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from dvp_client import Client
from dvp_schemas import DvpChoice
from dvp_server.model_store import load_tokenizer

TOP_ATOL = 1e-5
MODEL = "model"  # the tiny model's directory name, its served id
CHAT = [{"role": "user", "content": "What is 7*8? Answer in Japanese: 日本語"}]


@pytest.fixture(scope="module")
def oai(server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def dvp(server: str) -> Iterator[Client]:
    with Client(server, timeout=120, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return load_tokenizer(tiny_model_dir)


def _dvp(choice: Any) -> DvpChoice:
    assert choice.model_extra is not None and "dvp" in choice.model_extra
    return DvpChoice.model_validate(choice.model_extra["dvp"])


@pytest.mark.parametrize(
    "prompt", ["Once upon a time", ["Once upon a time", "The sky"], [1, 2, 3, 4]], ids=str
)
def test_completions_are_the_rollouts(
    oai: openai.OpenAI, dvp: Client, tokenizer: Any, prompt: Any
) -> None:
    rule = {"min_p": 0.02, "top_k": 40, "top_p": 0.95}
    out = oai.completions.create(
        model=MODEL,
        prompt=prompt,
        n=2,
        max_tokens=12,
        temperature=0.9,
        seed=21,
        top_p=rule["top_p"],
        logprobs=0,
        extra_body={"min_p": rule["min_p"], "top_k": rule["top_k"], "return_safe_token_ids": True},
    )
    prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
    ref = dvp.rollouts(
        prompts,
        n=2,
        max_tokens=12,
        temperature=0.9,
        seed=21,
        pruning=rule,
        return_safe_token_ids=True,
    )
    assert out.object == "text_completion" and out.model == MODEL
    assert len(out.choices) == len(ref.rollouts)
    assert out.usage is not None
    assert out.usage.model_dump(exclude_none=True) == ref.usage.model_dump()
    assert out.model_extra is not None and out.model_extra["dvp"]["pruning"] == rule
    for i, (choice, r) in enumerate(zip(out.choices, ref.rollouts, strict=True)):
        assert choice.index == i
        assert choice.text == r.text
        assert choice.finish_reason == r.finish_reason
        d = _dvp(choice)
        assert d.token_ids == r.token_ids and d.masked_logprobs == r.masked_logprobs
        assert d.safe_logmass == r.safe_logmass and d.safe_token_ids == r.safe_token_ids
        assert d.prompt_token_ids == r.prompt_token_ids and d.policy_version == 0
        assert max(d.safe_sizes) <= rule["top_k"]
        lp = choice.logprobs
        assert lp is not None and lp.tokens is not None and lp.text_offset is not None
        assert lp.tokens == [tokenizer.decode([t]) for t in r.token_ids]
        assert lp.token_logprobs == r.logprobs
        assert lp.top_logprobs is None  # logprobs=0: no alternatives
        assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))


def test_completion_top_logprobs(oai: openai.OpenAI) -> None:
    out = oai.completions.create(
        model=MODEL, prompt="Hello", max_tokens=16, logprobs=5, seed=5, temperature=0.4
    )
    lp = out.choices[0].logprobs
    assert lp is not None and lp.top_logprobs is not None and lp.tokens is not None
    assert lp.token_logprobs is not None
    hits = 0
    for token, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        values = list(top.values())
        assert 1 <= len(top) <= 5 and values == sorted(values, reverse=True)
        if token in top:
            hits += 1
            assert abs(top[token] - token_lp) <= TOP_ATOL
        else:
            assert token_lp <= min(values) + TOP_ATOL
    assert hits > 0


def test_chat_logprobs_and_bytes(oai: openai.OpenAI, dvp: Client, tokenizer: Any) -> None:
    out = oai.chat.completions.create(
        model=MODEL,
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=24,
        seed=3,
        n=2,
        logprobs=True,
        top_logprobs=2,
        extra_body={"min_p": 0.01},
    )
    ref = dvp.rollouts([CHAT], n=2, max_tokens=24, seed=3, pruning={"min_p": 0.01})
    assert out.object == "chat.completion"
    for choice, r in zip(out.choices, ref.rollouts, strict=True):
        assert choice.message.role == "assistant" and choice.message.content == r.text
        assert _dvp(choice).masked_logprobs == r.masked_logprobs
        content = choice.logprobs.content if choice.logprobs else None
        assert content is not None and len(content) == r.num_tokens
        assert [c.logprob for c in content] == r.logprobs
        raw = bytes(b for c in content for b in (c.bytes or []))
        assert raw.decode("utf-8", errors="replace") == tokenizer.decode(
            r.token_ids, skip_special_tokens=False
        )
        for c in content:
            assert len(c.top_logprobs) == 2
            assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
            assert c.logprob is not None and c.logprob <= c.top_logprobs[0].logprob + TOP_ATOL


def test_chat_without_logprobs_and_with_developer_role(oai: openai.OpenAI, dvp: Client) -> None:
    messages = [{"role": "developer", "content": "Be brief."}, *CHAT]
    out = oai.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_completion_tokens=8,
        seed=1,
        temperature=0,
    )
    as_system = [{"role": "system", "content": "Be brief."}, *CHAT]
    ref = dvp.rollouts([as_system], max_tokens=8, seed=1, temperature=0)
    assert out.choices[0].logprobs is None
    assert out.choices[0].message.content == ref.rollouts[0].text
    assert _dvp(out.choices[0]).safe_sizes == [1] * ref.rollouts[0].num_tokens  # greedy


# (id, route, body, status, param)
BAD: list[tuple[str, str, dict[str, Any], int, str | None]] = [
    ("stream", "completions", {"prompt": "a", "stream": True}, 422, "stream"),
    ("echo", "completions", {"prompt": "a", "echo": True}, 422, "echo"),
    ("best_of", "completions", {"prompt": "a", "best_of": 3}, 422, "best_of"),
    ("suffix", "completions", {"prompt": "a", "suffix": "z"}, 422, "suffix"),
    ("penalty", "completions", {"prompt": "a", "presence_penalty": 0.5}, 422, "presence_penalty"),
    ("logit_bias", "chat", {"logit_bias": {"5": 10}}, 422, "logit_bias"),
    ("tools", "chat", {"tools": [{"type": "function"}]}, 422, "tools"),
    ("top-without-logprobs", "chat", {"top_logprobs": 2}, 422, "top_logprobs"),
    ("logprobs-over-20", "completions", {"prompt": "a", "logprobs": 21}, 422, "logprobs"),
    ("unknown-extra", "completions", {"prompt": "a", "minp": 0.1}, 422, "minp"),
    ("mixed-prompt", "completions", {"prompt": ["a", [1, 2]]}, 422, "prompt.1"),
    ("empty-prompt", "completions", {"prompt": ""}, 422, "prompt"),
    ("bad-id", "completions", {"prompt": [1, 49152]}, 422, "prompt.1"),
    ("bad-id-2nd", "completions", {"prompt": [[1], [2, -3]]}, 422, "prompt.1.1"),
    ("max-tokens-cap", "completions", {"prompt": "a", "max_tokens": 401}, 422, "max_tokens"),
    ("max-completion-cap", "chat", {"max_completion_tokens": 401}, 422, "max_completion_tokens"),
    ("n-cap", "chat", {"n": 17}, 422, "n"),
    ("top-k-negative", "chat", {"top_k": -1}, 422, "top_k"),
    ("top-k-huge", "completions", {"prompt": "a", "top_k": 2**70}, 422, "top_k"),
    ("min-p", "chat", {"min_p": 2}, 422, "min_p"),
    (
        "long-chat",
        "chat",
        {"messages": [{"role": "user", "content": "hi " * 600}]},
        422,
        "messages",
    ),
    (
        "image-part",
        "chat",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        422,
        "messages.0.content",
    ),
    ("wrong-model", "chat", {"model": "gpt-4o"}, 404, "model"),
]


@pytest.mark.parametrize(
    ("route", "body", "status", "param"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_requests_name_the_field(
    oai: openai.OpenAI, route: str, body: dict[str, Any], status: int, param: str | None
) -> None:
    """The openai client gets a 4xx whose error body names the OpenAI field."""
    body = {"model": MODEL, "max_tokens": 2, **body}
    if route == "chat":
        body.setdefault("messages", CHAT)
        call: Any = oai.chat.completions.create
    else:
        call = oai.completions.create
    with pytest.raises(openai.APIStatusError) as err:
        call(
            **{k: v for k, v in body.items() if k in ("model", "messages", "prompt")},
            extra_body={k: v for k, v in body.items() if k not in ("model", "messages", "prompt")},
        )
    assert err.value.status_code == status
    error = err.value.body
    assert isinstance(error, dict)  # the openai client unwraps {"error": {...}}
    assert error["param"] == param, error
    assert error["code"] == status and error["message"]
