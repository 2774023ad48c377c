"""Unit tests of the hostile-input helpers (no server; the end-to-end battery is
tests/test_hostile.py):

- ``api.bodies.decode_json`` gives exactly ``json.loads``'s value on random
  documents at every chunk size (chunk edges inside numbers, strings, escapes
  and surrogate pairs), refuses what ``json.loads`` refuses, stops at the value
  cap and at the depth limit;
- ``api.bodies.unpack_msgpack`` (fed in chunks) gives ``msgpack.unpackb``'s value
  and refuses bin/ext, trailing and truncated data, and too many values;
- ``service.prompts``: no vocabulary entry of the tokenizer covers more
  characters than the bound says;
- ``dvp_schemas._text``: lone surrogates are found, valid text passes.
"""

from __future__ import annotations

import json
import random
from typing import Any

import msgpack
import pytest
from dvp_schemas._text import check_text, text_problem
from dvp_server.api import bodies
from dvp_server.errors import ServiceError
from dvp_server.model_store import load_tokenizer, resolve_model
from dvp_server.service.prompts import longest_token_bytes, text_bound

_PIECES = ["a", "é", '"', "\\", "\n", "\U0001f600", "\u2028", "/", "\t", ",", "]", "\x7f"]


def _random_doc(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth < 4 and r < 0.25:
        return [_random_doc(rng, depth + 1) for _ in range(rng.randint(0, 6))]
    if depth < 4 and r < 0.45:
        return {_random_text(rng): _random_doc(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    if r < 0.7:
        return _random_text(rng)
    if r < 0.85:
        return rng.randint(-(10**20), 10**20)
    return rng.choice([1.5, -2e-7, 1e300, 0.0, True, False, None])


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 30)))


@pytest.mark.parametrize("chunk", [7, 8, 13, 64, 1 << 16])
def test_decode_json_equals_json_loads(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(bodies, "CHUNK_CHARS", chunk)
    rng = random.Random(chunk)
    for _ in range(300):
        doc = _random_doc(rng)
        for text in (
            json.dumps(doc),
            json.dumps(doc, ensure_ascii=False),
            json.dumps(doc, indent=2),
        ):
            assert bodies.decode_json(text.encode(), 10**9) == json.loads(text)
    # a run of escaped surrogate pairs cut at every chunk edge stays pairs; a lone one stays lone
    text = '["' + "\\ud83d\\ude00" * 50 + '\\ud800x", ' + ", ".join(["123456789"] * 100) + "]"
    assert bodies.decode_json(text.encode(), 10**9) == json.loads(text)


@pytest.mark.parametrize(
    "text",
    ["[1,]", '{"a":1,}', "[1 2]", '{"a" 1}', "[", "", "1 2", "{1:2}", "[01]", '"abc', "[1,2",
     "nul", "[-]", '["a\x01"]', '["\\x"]', '["\\u12"]', '{"a\n": 1}'],
)  # fmt: skip
def test_decode_json_refuses_what_json_loads_refuses(text: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    with pytest.raises(json.JSONDecodeError):
        bodies.decode_json(text.encode(), 100)


def test_decode_json_limits_depth_values_and_encoding() -> None:
    deep = b"[" * (bodies.MAX_DEPTH + 1) + b"]" * (bodies.MAX_DEPTH + 1)
    with pytest.raises(json.JSONDecodeError, match="nested deeper"):
        bodies.decode_json(deep, 10**6)
    ok = b"[" * bodies.MAX_DEPTH + b"]" * bodies.MAX_DEPTH
    assert bodies.decode_json(ok, 10**6) is not None
    with pytest.raises(ServiceError) as err:
        bodies.decode_json(json.dumps({"a": list(range(101))}).encode(), 100)
    assert err.value.status == 413
    assert bodies.decode_json(json.dumps({"a": list(range(99))}).encode(), 100)["a"][-1] == 98
    with pytest.raises(json.JSONDecodeError, match="not UTF-8"):
        bodies.decode_json(b'["\xff"]', 100)


def test_unpack_msgpack_in_chunks() -> None:
    doc = {"prompts": [[1, 2, 300000], "text é", [{"role": "user", "content": "x"}]], "n": 2.5}
    packed = msgpack.packb(doc)
    for chunk in (1, 3, 64):
        assert bodies.unpack_msgpack(packed, 100, chunk) == msgpack.unpackb(packed)
    refused = [
        msgpack.packb({"a": b"xx"}, use_bin_type=True),
        msgpack.packb({"a": msgpack.ExtType(1, b"x")}),
        packed + b"\x01",
        packed[:-1],
        b"",
        b"\x91" * 2000 + b"\x90",  # nested 2000 deep: msgpack's StackError
    ]
    for body in refused:
        with pytest.raises((ValueError, msgpack.UnpackException)):
            bodies.unpack_msgpack(body, 100, 3)
    for body in (msgpack.packb(list(range(101))), msgpack.packb([[1] * 60, [2] * 60])):
        with pytest.raises(ServiceError) as err:
            bodies.unpack_msgpack(body, 100, 3)
        assert err.value.status == 413


def test_no_vocabulary_entry_covers_more_than_the_bound() -> None:
    tokenizer = load_tokenizer(resolve_model())
    longest = longest_token_bytes(tokenizer)
    covered = max(
        len(tokenizer.decode([i], skip_special_tokens=False)) for i in range(len(tokenizer))
    )
    assert 0 < covered <= longest
    assert text_bound(tokenizer, 10) == 10 * longest  # no normalizer: no slack


def test_lone_surrogates_are_found() -> None:
    assert text_problem("plain ascii") is None
    assert text_problem("é \U0001f600 \u2028") is None
    problem = text_problem("ok \ud83d then")
    assert problem is not None and "U+D83D at character 3" in problem
    with pytest.raises(ValueError, match="stop holds a lone UTF-16 surrogate U\\+DC00"):
        check_text("\udc00", "stop")
