"""msgpack bodies on /v1/rollouts against the real server (torch engine, tiny model).

- a msgpack request / response carries exactly the JSON response's values
  (floats packed as float32 where the server's values are float32: lossless),
  in fewer bytes; each direction is negotiated on its own header;
- bad msgpack bodies get the same 4xx error envelope as bad JSON, naming the
  field where there is one, and the body-size limit counts msgpack bytes;
- the client's ``msgpack=True`` (sync and async) gives the same batches.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import httpx
import msgpack
import pytest
from conftest import TINY_LIMITS
from dvp_client import AsyncClient, Client, UnprocessableEntityError
from dvp_server.api.codecs import pack

MSGPACK = "application/msgpack"
BODY: dict[str, Any] = {
    "prompts": ["The capital of France is", [1, 2, 3, 4, 5]],
    "n": 3,
    "sampling": {"max_tokens": 24, "seed": 5, "temperature": 0.7},
    "pruning": {"min_p": 0.02, "top_p": 0.9},
    "return_safe_token_ids": True,
}


def _post(server: str, body: bytes, content_type: str, accept: str) -> httpx.Response:
    headers = {"content-type": content_type, "accept": accept}
    return httpx.post(f"{server}/v1/rollouts", content=body, headers=headers, timeout=60)


def _without_id(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "id"}


@pytest.mark.parametrize(
    ("send", "accept"),
    [(MSGPACK, MSGPACK), (MSGPACK, "application/json"), ("application/json", MSGPACK)],
)
def test_msgpack_carries_the_json_values(server: str, send: str, accept: str) -> None:
    as_json = httpx.post(f"{server}/v1/rollouts", json=BODY, timeout=60)
    assert as_json.status_code == 200
    raw = msgpack.packb(BODY) if send == MSGPACK else httpx.Request("POST", "/", json=BODY).read()
    r = _post(server, raw, send, accept)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(accept)
    got = msgpack.unpackb(r.content) if accept == MSGPACK else r.json()
    assert _without_id(got) == _without_id(as_json.json())  # float32 packing is lossless
    if accept == MSGPACK:
        assert len(r.content) < 0.7 * len(as_json.content)
        assert got["temperature"] == 0.7 and got["pruning"]["top_p"] == 0.9  # float64 echoes


def test_float32_packing_only_where_values_are_float32() -> None:
    """pack(): float32 under the given keys (5 bytes a float), float64 elsewhere (9)."""
    data = {"temperature": 0.7, "rollouts": [{"masked_logprobs": [-0.5, -1.25]}]}
    f32 = pack(data)
    f64 = msgpack.packb(data)
    assert len(f64) - len(f32) == 2 * 4
    assert msgpack.unpackb(f32) == data  # both values are exact float32
    inexact = {"rollouts": [0.1]}
    assert msgpack.unpackb(pack(inexact))["rollouts"][0] != 0.1  # so never for f64 values
    assert math.isclose(msgpack.unpackb(pack(inexact))["rollouts"][0], 0.1, rel_tol=1e-7)


# (id, msgpack body, status, param, text in the message)
BAD_BODIES: list[tuple[str, bytes, int, str | None, str]] = [
    ("not-msgpack", b"\xc1\xc1\xc1", 422, None, "malformed msgpack"),
    ("trailing-data", msgpack.packb({"prompts": ["a"]}) + b"\x01", 422, None, "ExtraData"),
    ("truncated", msgpack.packb({"prompts": ["abcdef"]})[:-3], 422, None, "malformed msgpack"),
    ("binary-value", msgpack.packb({"prompts": [b"raw bytes"]}), 422, None, "JSON cannot carry"),
    ("ext-type", msgpack.packb({"prompts": [msgpack.ExtType(5, b"x")]}), 422, None, "carry"),
    ("int-map-key", msgpack.packb({1: ["a"]}, strict_types=False), 422, None, "malformed"),
    ("not-a-map", msgpack.packb([1, 2, 3]), 422, None, "valid dictionary"),
    ("unknown-field", msgpack.packb({"prompts": ["a"], "temprature": 1}), 422, "temprature", ""),
    ("bad-token", msgpack.packb({"prompts": [[1, 49152]]}), 422, "prompts.0.1", "vocabulary"),
    (
        "nan-temperature",
        msgpack.packb({"prompts": ["a"], "sampling": {"temperature": float("nan")}}),
        422,
        "sampling.temperature",
        "finite",
    ),
    ("n-zero", msgpack.packb({"prompts": ["a"], "n": 0}), 422, "n", "greater"),
]


@pytest.mark.parametrize(
    ("body", "status", "param", "text"),
    [b[1:] for b in BAD_BODIES],
    ids=[b[0] for b in BAD_BODIES],
)
def test_bad_msgpack_gets_the_error_envelope(
    server: str, body: bytes, status: int, param: str | None, text: str
) -> None:
    r = _post(server, body, MSGPACK, MSGPACK)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")  # errors stay JSON
    err = r.json()["error"]
    assert (err["code"], err["param"], err["type"]) == (status, param, "invalid_request_error")
    assert text in err["message"]


def test_body_limit_counts_msgpack_bytes(server: str) -> None:
    limit = TINY_LIMITS["max_request_bytes"]
    body = msgpack.packb({"prompts": [[1] * (limit // 3 + 10)] * 3})
    assert len(body) > limit
    r = _post(server, body, MSGPACK, MSGPACK)
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large_error"


def test_client_msgpack_option(server: str) -> None:
    kw: dict[str, Any] = {"n": 2, "max_tokens": 16, "seed": 9, "return_safe_token_ids": True}
    with (
        Client(server, timeout=60, max_retries=0) as plain,
        Client(server, timeout=60, max_retries=0, msgpack=True) as packed,
    ):
        a = plain.rollouts(BODY["prompts"], **kw)
        b = packed.rollouts(BODY["prompts"], **kw)
        assert a.model_dump(exclude={"id"}) == b.model_dump(exclude={"id"})
        with pytest.raises(UnprocessableEntityError) as err:  # error bodies still parse
            packed.rollouts([[1, 10**6]], max_tokens=2)
        assert err.value.param == "prompts.0.1"
        assert packed.models().data[0].engine == "torch"  # GET routes answer JSON

    async def run() -> Any:
        async with AsyncClient(server, timeout=60, max_retries=0, msgpack=True) as c:
            return await c.rollouts(BODY["prompts"], **kw)

    assert asyncio.run(run()).model_dump(exclude={"id"}) == a.model_dump(exclude={"id"})
