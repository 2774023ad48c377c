"""Bearer-key auth, request limits and backpressure (429 + Retry-After) on a real server.

One short-lived server of its own: ``DVP_API_KEY`` in its environment (the CLI
reads it), and a tiny admission capacity (``--max-batch 2 --max-queue 2``: four
rollouts at once) so that the queue fills with a handful of requests.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from _ops import metrics, own_server
from dvp_client import AsyncClient, AuthenticationError, Client
from dvp_server.api.auth import bearer_token

KEY = "s3cret-key-for-tests"
AUTH = {"authorization": f"Bearer {KEY}"}
CAPACITY = 4  # --max-batch 2 + --max-queue 2
LIMITS = {"max_tokens_cap": 64, "max_n": 4, "max_rollouts": 4, "max_prompt_tokens": 40}


@pytest.fixture(scope="module")
def kserver(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DVP_API_KEY", KEY)
        with own_server(
            tiny_model_dir,
            tmp_path_factory.mktemp("auth-server"),
            "--max-batch", "2",
            "--max-queue", "2",
            "--max-tokens-cap", str(LIMITS["max_tokens_cap"]),
            "--max-n", str(LIMITS["max_n"]),
            "--max-rollouts", str(LIMITS["max_rollouts"]),
            "--max-prompt-tokens", str(LIMITS["max_prompt_tokens"]),
            "--max-request-bytes", "20000",
        ) as server:  # fmt: skip
            mp.delenv("DVP_API_KEY")
            yield server.base_url


def test_bearer_token_parsing() -> None:
    assert bearer_token(b"Bearer abc") == b"abc"
    assert bearer_token(b"bearer  abc ") == b"abc"
    assert bearer_token(b"Basic abc") is None
    assert bearer_token(b"Bearer") is None
    assert bearer_token(b"") is None


ROUTES = [
    ("GET", "/v1/models"),
    ("GET", "/metrics"),
    ("GET", "/v1/weights"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("POST", "/v1/rollouts"),
    ("POST", "/v1/weights"),
    ("GET", "/no/such/route"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_every_route_but_health_needs_the_key(kserver: str, method: str, path: str) -> None:
    url = f"{kserver}{path}"
    for headers, why in (
        ({}, "missing"),
        ({"authorization": "Bearer wrong"}, "invalid"),
        ({"authorization": f"Basic {KEY}"}, "invalid"),
        ({"authorization": f"Bearer {KEY}x"}, "invalid"),
    ):
        r = httpx.request(method, url, headers=headers, json={}, timeout=30)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        err = r.json()["error"]
        assert err["code"] == 401 and err["type"] == "authentication_error"
        assert err["message"].startswith(why) and KEY not in err["message"]
    r = httpx.request(method, url, headers=AUTH, json={}, timeout=30)
    assert r.status_code != 401, r.text


def test_health_is_open_and_the_key_comes_before_the_body(kserver: str) -> None:
    assert httpx.get(f"{kserver}/health", timeout=30).status_code == 200
    big = b"x" * 50_000  # over --max-request-bytes: 401 without the key, 413 with it
    r = httpx.post(f"{kserver}/v1/rollouts", content=big, timeout=30)
    assert r.status_code == 401
    r = httpx.post(f"{kserver}/v1/rollouts", content=big, headers=AUTH, timeout=30)
    assert r.status_code == 413 and "20000 bytes" in r.json()["error"]["message"]


def test_clients_send_the_key(kserver: str) -> None:
    with Client(kserver, api_key=KEY) as c:
        assert c.models().data[0].policy_version == 0
    with Client(kserver, api_key="nope", max_retries=0) as c, pytest.raises(AuthenticationError):
        c.models()


LIMIT_CASES: list[tuple[dict[str, Any], int, str | None, str]] = [
    ({"n": 5}, 422, "n", "limit 4"),
    ({"prompts": ["a", "b", "c"], "n": 2}, 422, "n", "limit of 4"),
    ({"sampling": {"max_tokens": 65}}, 422, "sampling.max_tokens", "cap 64"),
    ({"prompts": [[7] * 41]}, 422, "prompts.0", "allows 40"),
    ({"prompts": ["z" * 30_000]}, 413, None, "limit of 20000 bytes"),
]


@pytest.mark.parametrize(("over", "status", "param", "text"), LIMIT_CASES)
def test_limits_from_the_cli_name_the_limit(
    kserver: str, over: dict[str, Any], status: int, param: str | None, text: str
) -> None:
    body = {"prompts": ["hi"], "sampling": {"max_tokens": 2}, **over}
    r = httpx.post(f"{kserver}/v1/rollouts", json=body, headers=AUTH, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and text in err["message"], err


def _long_request(base: str, seed: int) -> httpx.Response:
    body = {"prompts": ["q"], "n": 2, "sampling": {"max_tokens": 32, "ignore_eos": True}}
    body["sampling"]["seed"] = seed  # type: ignore[index]
    return httpx.post(f"{base}/v1/rollouts", json=body, headers=AUTH, timeout=600)


@pytest.mark.slow
def test_a_full_queue_answers_429_with_retry_after(kserver: str) -> None:
    before = metrics(kserver, AUTH).get("dvp_admission_rejected_total", 0.0)
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda s: _long_request(kserver, s), range(6)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= CAPACITY // 2 and 429 in codes, codes
    assert set(codes) <= {200, 429}
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
            err = r.json()["error"]
            assert err["type"] == "rate_limit_error" and "--max-queue" in err["message"]
        else:
            assert all(len(ro["token_ids"]) == 32 for ro in r.json()["rollouts"])
    after = metrics(kserver, AUTH)
    assert after["dvp_admission_rejected_total"] >= before + codes.count(429)
    assert after["dvp_rollouts_admitted"] == 0 and after["dvp_queue_capacity"] == CAPACITY


@pytest.mark.slow
def test_the_client_honours_retry_after(kserver: str) -> None:
    """Seeded requests from the async client all succeed through 429s, each retry sent
    no earlier than the server's Retry-After (1 s) after its 429."""
    events: dict[str, list[tuple[float, int]]] = {}  # id -> (time, 0 sent | status)

    async def on_request(request: httpx.Request) -> None:
        events.setdefault(request.headers["x-request-id"], []).append((time.monotonic(), 0))

    async def on_response(response: httpx.Response) -> None:
        rid = response.request.headers["x-request-id"]
        events[rid].append((time.monotonic(), response.status_code))

    async def run() -> list[Any]:
        hooks = {"request": [on_request], "response": [on_response]}
        http = httpx.AsyncClient(event_hooks=hooks, timeout=600)
        async with AsyncClient(kserver, api_key=KEY, max_retries=30, http_client=http) as c:
            calls = [
                c.rollouts(["q"], n=2, max_tokens=24, ignore_eos=True, seed=s) for s in range(6)
            ]
            out = await asyncio.gather(*calls)
        await http.aclose()
        return out

    batches = asyncio.run(run())
    assert all(len(r.token_ids) == 24 for b in batches for r in b.rollouts)
    gaps = [
        t_next - t_429
        for ev in events.values()
        for (t_429, code), (t_next, kind) in itertools.pairwise(ev)
        if code == 429 and kind == 0
    ]
    assert gaps, "the queue never filled: no retry to check"
    assert min(gaps) >= 0.9, gaps  # Retry-After: 1, no jitter below it
    assert all(ev[-1][1] == 200 for ev in events.values())
