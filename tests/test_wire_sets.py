"""Safe sets on the wire, end to end: the whole-vocabulary marker, the packed format, and
the bound on one request's response size (real server, torch engine, tiny model).

The tiny model is random, so at min_p = 1e-3 most of its sets are large (dense
steps: bitmaps in the packed format) and some are the whole vocabulary (marker);
with top_k they are small (varints). Every format and transport must carry the
same sets: "list" JSON is the reference.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
import torch
from conftest import TINY_LIMITS
from dvp_client import Client, RolloutBatch, join_rollout_stream
from dvp_client.safe_ids import decode_packed, expand_full
from dvp_client.train.objective import pruned_logprobs
from dvp_client.train.tensors import SafeSets
from dvp_schemas import PruningRule, RolloutRequest
from dvp_server.errors import ServiceError
from dvp_server.model_store import load_tokenizer
from dvp_server.service.response_size import check_response_size, response_bound, token_bytes

VOCAB = 49152  # the tiny model's (SmolLM2's tokenizer)
PROMPTS: list[Any] = ["The capital of France is", [1, 2, 3, 4, 5]]
RULES = [{"min_p": 1e-3}, {"min_p": 1e-3, "top_k": 40}]


def _body(pruning: dict[str, Any] | None, fmt: str, **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompts": PROMPTS,
        "n": 2,
        "sampling": {"max_tokens": 6, "seed": 11, "ignore_eos": True},
        "return_safe_token_ids": True,
        "safe_token_ids_format": fmt,
        **kw,
    }
    if pruning is not None:
        body["pruning"] = pruning
    return body


@pytest.fixture(scope="module")
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


def _post(http: httpx.Client, body: dict[str, Any], msgpack_: bool = False) -> httpx.Response:
    accept = "application/msgpack" if msgpack_ else "application/json"
    r = http.post("/v1/rollouts", json=body, headers={"accept": accept})
    assert r.status_code == 200, r.text[:500]
    return r


def _sets(rollout: dict[str, Any]) -> list[list[int]]:
    """Every step's set of a raw rollout, either format, the marker expanded."""
    st, sizes = rollout["safe_token_ids"], rollout["safe_sizes"]
    if st.get("format") == "packed":
        data = st["data"] if isinstance(st["data"], bytes) else _b64(st["data"])
        offsets, ids = expand_full(*decode_packed(data, np.array(sizes), VOCAB), sizes, VOCAB)
    else:
        offsets, ids = expand_full(np.array(st["offsets"]), np.array(st["ids"]), sizes, VOCAB)
    return [ids[offsets[t] : offsets[t + 1]].tolist() for t in range(len(sizes))]


def _b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def test_unpruned_sets_are_a_marker_and_read_back_full(
    http: httpx.Client, server: str, tiny_model_dir: Path
) -> None:
    """No pruning + return_safe_token_ids: no ids on the wire (V per step before), and the
    client's tensors are the full sets, with the same pruned log-probs as V listed ids."""
    listed = _post(http, _body(None, "list"))
    packed = _post(http, _body(None, "packed"), msgpack_=True)
    steps = 0
    for r in listed.json()["rollouts"]:
        st = r["safe_token_ids"]
        assert st["ids"] == [] and set(st["offsets"]) == {0} and st["vocab_size"] == VOCAB
        assert r["safe_sizes"] == [VOCAB] * len(r["token_ids"])
        steps += len(r["token_ids"])
    for r in msgpack.unpackb(packed.content)["rollouts"]:
        assert r["safe_token_ids"] == {"format": "packed", "vocab_size": VOCAB, "data": b""}
    assert len(listed.content) < 200 * steps + 4000  # V ids would be ~290 KB per step
    with Client(server, timeout=120, max_retries=0) as c:
        batch = c.rollouts(PROMPTS, n=2, max_tokens=6, seed=11, return_safe_token_ids=True)
    assert all(r.safe_token_ids.step(0) == list(range(VOCAB)) for r in batch.rollouts)  # type: ignore[union-attr]
    t = batch.to_torch()
    assert t.safe is not None and t.safe.is_full
    # against the sets listed in full (what the server sent before the marker)
    b, n = t.tokens.shape
    rows = t.loss_mask.reshape(-1).long() * VOCAB
    offsets = torch.zeros(b * n + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(rows, 0)
    ids = torch.arange(VOCAB).repeat(int(t.loss_mask.sum()))
    listed_sets = SafeSets((b, n), offsets, ids, temperature=t.temperature)
    logits = _model_logits(tiny_model_dir, t)
    got = pruned_logprobs(logits, t.tokens, t.safe, mask=t.loss_mask)
    want = pruned_logprobs(logits, t.tokens, listed_sets, mask=t.loss_mask)
    # Both against float64: the full-set path sums exp over V in one pass (as exact as
    # a float32 log_softmax); the listed ids' scatter-add path drifts by ~1e-4 at V = 49152.
    ref = torch.log_softmax(logits.double() / t.temperature, -1)
    ref = ref.gather(-1, t.tokens.unsqueeze(-1)).squeeze(-1).float()
    m = t.loss_mask
    torch.testing.assert_close(got.logprobs[m], ref[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(want.logprobs[m], ref[m], atol=5e-4, rtol=0)
    engine = t.engine_masked_logprobs[t.loss_mask]
    torch.testing.assert_close(got.logprobs[t.loss_mask], engine, atol=5e-5, rtol=0)


def _model_logits(model_dir: Path, t: Any) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(t.input_ids, attention_mask=t.attention_mask, position_ids=t.position_ids)
    return t.completion_logits(out.logits)


@pytest.mark.parametrize("pruning", RULES, ids=["min_p", "min_p+top_k"])
def test_every_format_and_transport_carries_the_same_sets(
    http: httpx.Client, server: str, pruning: dict[str, Any]
) -> None:
    ref = _post(http, _body(pruning, "list")).json()["rollouts"]
    want = [_sets(r) for r in ref]
    kinds = {len(s) == VOCAB for r in want for s in r}
    raw = {
        "packed json": _post(http, _body(pruning, "packed")).json(),
        "packed msgpack": msgpack.unpackb(_post(http, _body(pruning, "packed"), True).content),
    }
    for name, body in raw.items():
        assert [_sets(r) for r in body["rollouts"]] == want, name
    kw: dict[str, Any] = {
        "n": 2,
        "max_tokens": 6,
        "seed": 11,
        "ignore_eos": True,
        "pruning": pruning,
    }
    for use_msgpack in (False, True):
        with Client(server, timeout=120, max_retries=0, msgpack=use_msgpack) as c:
            batch = c.rollouts(PROMPTS, return_safe_token_ids=True, **kw)
            joined = join_rollout_stream(
                list(c.stream_rollouts(PROMPTS, return_safe_token_ids=True, **kw))
            )
        for got in (batch, joined):
            assert [[r.safe_token_ids.step(t) for t in range(r.num_tokens)]  # type: ignore[union-attr]
                    for r in got.rollouts] == want  # fmt: skip
            assert [r.token_ids for r in got.rollouts] == [r["token_ids"] for r in ref]
        _same_tensors(batch, ref)
    if pruning.get("top_k") is None:
        assert kinds == {True, False} or kinds == {False}  # the marker, and listed sets


def _same_tensors(batch: RolloutBatch, ref: list[dict[str, Any]]) -> None:
    """to_torch of the packed batch = the CSR of the list-format reference."""
    t = batch.to_torch()
    assert t.safe is not None and not t.safe.is_full
    rows, cols = t.safe.to_index()
    width = t.tokens.shape[1]
    for i, r in enumerate(ref):
        for step, s in enumerate(_sets(r)):
            assert cols[rows == i * width + step].tolist() == s


def test_stream_chunks_of_a_raw_stream_are_packed(http: httpx.Client) -> None:
    body = _body(RULES[0], "packed", stream=True)
    with http.stream("POST", "/v1/rollouts", json=body) as r:
        assert r.status_code == 200
        lines = [json.loads(x) for x in r.iter_lines() if x.strip()]
    chunks = [x for x in lines if x["object"] == "rollout.chunk"]
    assert chunks and all(c["safe_token_ids"]["format"] == "packed" for c in chunks)
    assert all(isinstance(c["safe_token_ids"]["data"], str) for c in chunks)  # base64


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("use_msgpack", [False, True])
def test_a_response_whose_worst_case_is_too_large_is_served_when_its_sets_fit(
    http: httpx.Client, use_msgpack: bool, stream: bool
) -> None:
    """64 rollouts x 64 tokens of min-p sets listed as ids could reach ~1.2 GB, over the
    512 MiB default; the guard counts the sets produced, so the request is served."""
    body = {
        "prompts": ["a", "b", "c", "d"],
        "n": TINY_LIMITS["max_n"],
        "sampling": {"max_tokens": 64, "seed": 0},
        "pruning": {"min_p": 1e-3},
        "return_safe_token_ids": True,
        "stream": stream,
    }
    request = RolloutRequest.model_validate(body)
    assert response_bound(request, [(1, 64)] * 64, vocab_size=VOCAB, token_bytes=1).total > (
        512 << 20
    )
    headers = {"accept": "application/msgpack" if use_msgpack else "application/json"}
    r = http.post("/v1/rollouts", json=body, headers=headers)
    assert r.status_code == 200, r.text[:300]
    assert len(r.content) < 512 << 20


@pytest.mark.parametrize("fmt", ["list", "packed"])
@pytest.mark.parametrize("stream", [False, True])
def test_real_responses_stay_under_their_bound(
    http: httpx.Client, tiny_model_dir: Path, fmt: str, stream: bool
) -> None:
    tok_bytes = token_bytes(load_tokenizer(tiny_model_dir))
    for pruning in (None, *RULES):
        body = _body(pruning, fmt, stream=stream)
        request = RolloutRequest.model_validate(body)
        for use_msgpack in (False, True):
            content = _post(http, body, use_msgpack).content
            if stream:
                rolls = _events(content, use_msgpack)[-1]["rollouts"]  # the summary
            else:
                decoded = msgpack.unpackb(content) if use_msgpack else json.loads(content)
                rolls = decoded["rollouts"]
            prompts = [len(r["prompt_token_ids"]) for r in rolls]
            jobs = [(p, 6) for p in prompts]
            bound = response_bound(request, jobs, vocab_size=VOCAB, token_bytes=tok_bytes)
            assert len(content) <= bound.total, (pruning, use_msgpack)


def _events(content: bytes, use_msgpack: bool) -> list[Any]:
    """The events of a whole stream body (NDJSON or concatenated msgpack maps)."""
    if use_msgpack:
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(content)
        return list(unpacker)
    return [json.loads(line) for line in content.splitlines() if line.strip()]


def test_bound_names_the_field_and_scales_with_the_format() -> None:
    rl = RolloutRequest.model_validate(_body({"min_p": 1e-3}, "list"))
    rp = RolloutRequest.model_validate(_body({"min_p": 1e-3}, "packed"))
    rk = RolloutRequest.model_validate(_body({"top_k": 20}, "packed"))
    rn = RolloutRequest.model_validate(_body(None, "list"))
    jobs = [(10, 128)] * 256  # the RL workload: 32 prompts x n = 8 x 128 tokens
    b = {
        name: response_bound(r, jobs, vocab_size=VOCAB, token_bytes=48)
        for name, r in {"list": rl, "packed": rp, "top_k": rk, "none": rn}.items()
    }
    # list: V - 1 ids of up to 6 bytes per step; packed: a bitmap of V / 8, base64
    assert b["list"].sets >= 256 * 128 * (VOCAB - 1) * 6
    assert b["packed"].sets <= 256 * (128 * (VOCAB // 8) * 4 // 3 + 6)  # + quotes, padding
    assert b["top_k"].sets <= 256 * (128 * 20 * 5 * 4 // 3 + 6)
    assert b["none"].sets == 256 * 128 * 12  # offsets only: every set is the marker
    assert b["packed"].total < 512 << 20 < b["list"].total  # the default limit
    # the worst case of the sets no longer refuses a request up front: they are counted
    budget = check_response_size(rl, jobs, vocab_size=VOCAB, token_bytes=48, limit=512 << 20)
    assert budget is not None and budget.budget == (512 << 20) - (b["list"].total - b["list"].sets)
    assert check_response_size(rp, jobs, vocab_size=VOCAB, token_bytes=48, limit=512 << 20)
    with pytest.raises(Exception) as err:
        check_response_size(rn, jobs, vocab_size=VOCAB, token_bytes=48, limit=1 << 20)
    assert err.value.param == "sampling.max_tokens"  # type: ignore[attr-defined]
    greedy = rl.model_copy(update={"sampling": rl.sampling.model_copy(update={"temperature": 0})})
    assert response_bound(greedy, jobs, vocab_size=VOCAB, token_bytes=48).sets < b["top_k"].sets
    assert PruningRule(top_k=20).prunes


def _chunk(sizes: list[int]) -> Any:
    """What a set budget reads of a chunk: its steps' set sizes."""
    return SimpleNamespace(safe_sizes=np.asarray(sizes, dtype=np.int32))


@pytest.mark.parametrize("fmt", ["list", "packed"])
def test_set_budget_follows_the_sets_produced(fmt: str) -> None:
    request = RolloutRequest.model_validate(_body({"min_p": 1e-3}, fmt))
    jobs = [(10, 64)] * 64  # 16 prompts x n = 4 x 64 tokens
    budget = check_response_size(request, jobs, vocab_size=VOCAB, token_bytes=48, limit=64 << 20)
    assert budget is not None
    for _ in range(64 * 4):  # realistic sets (mean |S| ~150) and whole-vocabulary markers
        budget.add(_chunk([150] * 15 + [VOCAB]))
    assert budget.used < 64 << 20
    hostile = check_response_size(request, jobs, vocab_size=VOCAB, token_bytes=48, limit=16 << 20)
    assert hostile is not None
    with pytest.raises(ServiceError) as err:
        for _ in range(64 * 4):  # every step's set near V
            hostile.add(_chunk([VOCAB - 1] * 16))
    assert err.value.param == "return_safe_token_ids"
    assert hostile.used <= hostile.budget + 16 * (VOCAB * 6 + 12)  # stopped at the chunk
    assert "packed" in err.value.message  # the advice, or the format already used
    assert ('send safe_token_ids_format "packed"' in err.value.message) == (fmt == "list")
