"""Joining engine chunks into one columnar rollout (``dvp_server.service.assembly``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from dvp_client.safe_ids import decode_packed, expand_full
from dvp_server.engines.base import EngineError, RolloutChunk
from dvp_server.service.assembly import assemble_rollout


def _chunk(rng: np.random.Generator, t: int, **kw: Any) -> RolloutChunk:
    """A random but self-consistent chunk of ``t`` steps with CSR safe sets."""
    sizes = rng.integers(1, 6, size=t)
    sets = [np.sort(rng.choice(100, size=s, replace=False)) for s in sizes]
    tokens = np.array([rng.choice(s) for s in sets], dtype=np.int64)
    full = -rng.random(t).astype(np.float32) * 3
    logmass = -rng.random(t).astype(np.float32)
    return RolloutChunk(
        token_ids=tokens,
        logprobs=full,
        masked_logprobs=full - logmass,
        safe_logmass=logmass,
        safe_sizes=sizes.astype(np.int64),
        safe_ids=np.concatenate(sets).astype(np.int32) if t else np.zeros(0, np.int32),
        safe_offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        **kw,
    )


def _assemble(chunks: list[RolloutChunk], **kw: Any) -> Any:
    args: dict[str, Any] = {
        "prompt_index": 2,
        "sample_index": 1,
        "prompt_ids": [5, 6],
        "seed": 9,
        "tokenizer": None,
        "with_logprobs": True,
        "with_logmass": True,
        "with_safe_ids": True,
        "vocab_size": 100,
        **kw,
    }
    return assemble_rollout("r-2-1", chunks, **args)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunks_concatenate_into_columns_and_csr(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = [3, 0, 5, 1]  # an empty chunk in the middle is allowed
    chunks = [_chunk(rng, t) for t in lengths]
    chunks[-1].finish_reason = "length"
    r = _assemble(chunks)
    assert (r.prompt_index, r.sample_index, r.prompt_token_ids, r.seed) == (2, 1, [5, 6], 9)
    assert r.token_ids == np.concatenate([c.token_ids for c in chunks]).tolist()
    assert r.num_tokens == sum(lengths)
    np.testing.assert_array_equal(
        r.masked_logprobs, np.concatenate([c.masked_logprobs for c in chunks])
    )
    # Each step's safe set, read back from the joined CSR, is the chunk's own.
    steps = [
        c.safe_ids[c.safe_offsets[t] : c.safe_offsets[t + 1]].tolist()  # type: ignore[index]
        for c in chunks
        for t in range(len(c.token_ids))
    ]
    assert r.safe_token_ids is not None
    assert [r.safe_token_ids.step(t) for t in range(r.num_tokens)] == steps
    assert np.diff(r.safe_token_ids.offsets).tolist() == r.safe_sizes
    assert r.finish_reason == "length" and r.outside_safe_set is None


def test_nan_becomes_null_and_missing_fields_are_null() -> None:
    rng = np.random.default_rng(3)
    c = _chunk(rng, 4, finish_reason="stop", stop_reason=7)
    c.logprobs[[0, 2]] = np.nan
    c.safe_logmass[1] = np.nan
    r = _assemble([c])
    assert r.logprobs[0] is None and r.logprobs[2] is None
    assert r.logprobs[1] is not None and not math.isnan(r.logprobs[1])
    assert r.safe_logmass[1] is None and r.safe_logmass[0] is not None
    assert (r.finish_reason, r.stop_reason) == ("stop", 7)
    bare = _assemble([c], with_logprobs=False, with_logmass=False, with_safe_ids=False)
    assert bare.logprobs is None and bare.safe_logmass is None and bare.safe_token_ids is None


def test_stop_string_is_cut_from_the_text() -> None:
    class Tok:
        def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
            assert skip_special_tokens
            return "the answer is 56.\n\nUser: more"

    c = _chunk(np.random.default_rng(4), 2, finish_reason="stop", stop_reason="\n\n")
    assert _assemble([c], tokenizer=Tok()).text == "the answer is 56."
    c.stop_reason = None
    assert _assemble([c], tokenizer=Tok()).text == "the answer is 56.\n\nUser: more"


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("versions", "versions go back"),
        ("kv_newer", "KV is newer"),
        ("ragged", "different lengths"),
        ("no_safe_ids", "not returned"),
        ("bad_offsets", "inconsistent CSR"),
    ],
)
def test_contract_violations_are_engine_errors(breakage: str, message: str) -> None:
    rng = np.random.default_rng(5)
    a, b = _chunk(rng, 3), _chunk(rng, 2, finish_reason="length")
    if breakage == "versions":
        a.policy_version = 1  # a later chunk from older weights
    elif breakage == "kv_newer":
        b.kv_versions = np.full(2, 1, dtype=np.int64)  # read KV from weights not yet sampling
    elif breakage == "ragged":
        b.safe_sizes = b.safe_sizes[:1]
    elif breakage == "no_safe_ids":
        b.safe_ids = None
    else:
        b.safe_offsets = b.safe_offsets[:-1]  # type: ignore[index]
    with pytest.raises(EngineError, match=message):
        _assemble([a, b])


def test_version_spans_follow_the_tokens_across_chunks() -> None:
    """Per-token versions from the chunks become runs, a span per change, in token
    order; a rollout of one version has one span and keeps its policy_version."""
    rng = np.random.default_rng(6)
    a, b = _chunk(rng, 4), _chunk(rng, 3, finish_reason="length")
    one = _assemble([a, b])
    assert one.version_spans == [(0, 0, 0)] and one.policy_version == 0
    a.policy_versions = np.array([2, 2, 3, 3], dtype=np.int64)
    a.kv_versions = np.array([2, 2, 2, 2], dtype=np.int64)
    b.policy_versions = np.array([3, 4, 4], dtype=np.int64)
    b.kv_versions = np.array([2, 4, 4], dtype=np.int64)
    r = _assemble([a, b])
    assert r.version_spans == [(0, 2, 2), (2, 3, 2), (5, 4, 4)]
    assert r.policy_version == 2
    assert r.token_policy_versions == [2, 2, 3, 3, 3, 4, 4]
    assert r.token_kv_versions == [2, 2, 2, 2, 2, 4, 4]


def test_flagged_steps_are_listed_across_chunks() -> None:
    rng = np.random.default_rng(6)
    a = _chunk(rng, 3, outside_safe_set=np.array([False, True, False]))
    b = _chunk(rng, 2, finish_reason="length")  # an engine may flag only some chunks
    c = _chunk(rng, 2, finish_reason="length", outside_safe_set=np.array([True, False]))
    assert _assemble([a, b]).outside_safe_set == [1]
    assert _assemble([a, c]).outside_safe_set == [1, 3]


@pytest.mark.parametrize("listed", [True, False])
def test_whole_vocabulary_steps_become_the_marker(listed: bool) -> None:
    """A step whose set is all V ids (listed by the engine, or an empty row) is sent as
    an empty row ("list") or no bytes ("packed"), and reads back as the full set."""
    rng = np.random.default_rng(5)
    c = _chunk(rng, 4, finish_reason="length")
    sets = [c.safe_ids[c.safe_offsets[t] : c.safe_offsets[t + 1]] for t in range(4)]  # type: ignore[index]
    sets[1] = np.arange(100) if listed else np.zeros(0, np.int64)
    sets[3] = np.arange(100) if listed else np.zeros(0, np.int64)
    c.safe_sizes[[1, 3]] = 100
    c.safe_ids = np.concatenate(sets).astype(np.int32)
    c.safe_offsets = np.concatenate([[0], np.cumsum([len(s) for s in sets])]).astype(np.int64)
    want = [s.tolist() if len(s) else list(range(100)) for s in sets]
    r = _assemble([c])
    assert r.safe_token_ids.vocab_size == 100
    assert len(r.safe_token_ids.ids) == sum(len(w) for w in want) - 200  # no V ids sent
    assert [r.safe_token_ids.step(t) for t in range(4)] == want
    p = _assemble([c], safe_format="packed")
    assert p.safe_token_ids.format == "packed" and p.safe_token_ids.vocab_size == 100
    offsets, ids = expand_full(
        *decode_packed(p.safe_token_ids.data, p.safe_sizes, 100), p.safe_sizes, 100
    )
    assert [ids[offsets[t] : offsets[t + 1]].tolist() for t in range(4)] == want


def test_packed_round_trips_the_joined_chunks() -> None:
    rng = np.random.default_rng(6)
    chunks = [_chunk(rng, t) for t in (2, 0, 3)]
    chunks[-1].finish_reason = "length"
    listed, packed = _assemble(chunks), _assemble(chunks, safe_format="packed")
    offsets, ids = decode_packed(packed.safe_token_ids.data, packed.safe_sizes, 100)
    assert offsets.tolist() == listed.safe_token_ids.offsets
    assert ids.tolist() == listed.safe_token_ids.ids
