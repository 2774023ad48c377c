"""Streamed rollouts (``"stream": true``) against the real server (torch engine).

- a stream, joined, is exactly the non-streamed response of the same seeded
  request (JSON lines and msgpack, sync and async client);
- chunks arrive while the rollouts still decode (the engine still holds them);
- a bad request gets its 4xx before any stream; an engine failure mid-stream
  ends the stream with an ``error`` line (503, engine_error);
- a client that disconnects frees its engine rows within one decoding step;
- a full queue answers a stream request with a plain 429 (Retry-After), not a
  stream that fails.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ServerProcess
from dvp_client import (
    APIStreamError,
    AsyncClient,
    Client,
    RolloutStreamChunk,
    RolloutStreamSummary,
    UnprocessableEntityError,
    join_rollout_stream,
)
from dvp_server.api.app import create_app
from dvp_server.config import ServerConfig
from fastapi.testclient import TestClient

PROMPTS: list[Any] = [
    "The capital of France is",
    [1, 2, 3, 4, 5],
    [{"role": "user", "content": "Hi"}],
]
KW: dict[str, Any] = {
    "n": 2,
    "max_tokens": 40,
    "seed": 11,
    "pruning": {"min_p": 0.02},
    "return_safe_token_ids": True,
}
FLUSH_EVERY = 16  # the torch engine's default steps per chunk


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[Client]:
    with Client(server, timeout=120, max_retries=0) as c:
        yield c


def _check_chunk_order(events: list[Any]) -> None:
    """One summary, last; every rollout's chunks contiguous in steps, the last one finished."""
    assert isinstance(events[-1], RolloutStreamSummary)
    assert not any(isinstance(e, RolloutStreamSummary) for e in events[:-1])
    steps: dict[tuple[int, int], int] = {}
    finished: set[tuple[int, int]] = set()
    for e in events[:-1]:
        assert isinstance(e, RolloutStreamChunk)
        key = (e.prompt_index, e.sample_index)
        assert key not in finished, f"{key}: a chunk after its last one"
        assert e.start == steps.get(key, 0)
        assert 1 <= len(e.token_ids) <= FLUSH_EVERY  # one engine chunk, not the whole rollout
        assert len(e.masked_logprobs) == len(e.safe_sizes) == len(e.token_ids)
        steps[key] = e.start + len(e.token_ids)
        if e.finish_reason is not None:
            finished.add(key)
    assert finished == set(steps)
    assert [(r.prompt_index, r.sample_index, r.num_tokens) for r in events[-1].rollouts] == [
        (i, j, steps[(i, j)]) for i in range(len(PROMPTS)) for j in range(KW["n"])
    ]


@pytest.mark.parametrize("msgpack", [False, True], ids=["ndjson", "msgpack"])
def test_stream_joins_to_the_plain_response(server: str, msgpack: bool) -> None:
    with Client(server, timeout=120, max_retries=0, msgpack=msgpack) as c:
        plain = c.rollouts(PROMPTS, **KW)
        events = list(c.stream_rollouts(PROMPTS, **KW))
    _check_chunk_order(events)
    assert any(len(e.token_ids) < r.num_tokens for e in events[:-1] for r in plain.rollouts[:1])
    joined = join_rollout_stream(events)
    assert joined.model_dump(exclude={"id"}) == plain.model_dump(exclude={"id"})


def test_async_stream_joins_to_the_plain_response(server: str) -> None:
    async def run() -> tuple[Any, list[Any]]:
        async with AsyncClient(server, timeout=120, max_retries=0) as c:
            plain = await c.rollouts(PROMPTS, **KW)
            events = [e async for e in c.stream_rollouts(PROMPTS, **KW)]
            return plain, events

    plain, events = asyncio.run(run())
    _check_chunk_order(events)
    assert join_rollout_stream(events).model_dump(exclude={"id"}) == plain.model_dump(
        exclude={"id"}
    )


def test_raw_ndjson_lines(server: str) -> None:
    """The wire format itself: application/x-ndjson, one JSON object per line."""
    body = {"prompts": ["a"], "n": 1, "sampling": {"max_tokens": 20, "seed": 1}, "stream": True}
    with httpx.stream("POST", f"{server}/v1/rollouts", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(x) for x in r.iter_lines() if x]
    assert [x["object"] for x in lines] == ["rollout.chunk"] * (len(lines) - 1) + [
        "rollout.summary"
    ]
    assert lines[-1]["usage"]["completion_tokens"] == sum(len(x["token_ids"]) for x in lines[:-1])


def test_chunks_arrive_while_rollouts_decode(client: Client) -> None:
    """The first chunk comes while the engine still holds the request's rollouts."""
    stream = client.stream_rollouts(["Once"], n=4, max_tokens=200, seed=2, ignore_eos=True)
    first = next(stream)
    active = client.health().active_rollouts
    rest = list(stream)
    assert isinstance(first, RolloutStreamChunk) and first.start == 0
    assert active is not None and active >= 1, "the stream was buffered until the end"
    assert sum(len(e.token_ids) for e in [first, *rest[:-1]]) == 4 * 200


def test_bad_request_is_refused_before_the_stream(client: Client, server: str) -> None:
    with pytest.raises(UnprocessableEntityError) as err:
        list(client.stream_rollouts([[1, 2, 10**6]], max_tokens=4))
    assert err.value.param == "prompts.0.2"
    r = httpx.post(f"{server}/v1/rollouts", json={"prompts": ["a"], "stream": "maybe"}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["param"] == "stream"


def test_engine_failure_mid_stream_ends_with_an_error_line(tiny_model_dir: Path) -> None:
    app = create_app(ServerConfig(model=str(tiny_model_dir), engine="torch", max_batch=4))
    body = {"prompts": ["a"], "n": 2, "sampling": {"max_tokens": 60, "seed": 0}, "stream": True}
    with TestClient(app, raise_server_exceptions=False) as c:
        engine = app.state.engine  # type: ignore[attr-defined]
        calls = 0

        def fail_later(request_ids: Any) -> None:
            nonlocal calls
            calls += 1
            if calls > FLUSH_EVERY + 2:  # after the first chunk went out
                raise RuntimeError("simulated kernel failure")

        engine.step_hook = fail_later
        try:
            r = c.post("/v1/rollouts", json=body)
        finally:
            engine.step_hook = None
        lines = [json.loads(x) for x in r.text.splitlines() if x]
        assert r.status_code == 200
        assert lines[0]["object"] == "rollout.chunk"
        assert lines[-1]["object"] == "error"
        assert lines[-1]["error"]["code"] == 503 and lines[-1]["error"]["type"] == "engine_error"
        assert "simulated kernel failure" in lines[-1]["error"]["message"]
        assert engine.active_rollouts == 0
        ok = c.post("/v1/rollouts", json={**body, "stream": False})
        assert ok.status_code == 200


def test_stream_error_line_raises_in_the_client() -> None:
    """The client's decoder turns an error line into APIStreamError (code, type)."""
    from dvp_client._streaming import EventDecoder

    line = b'{"object": "error", "error": {"type": "engine_error", "message": "x", "code": 503}}\n'
    response = httpx.Response(200, headers={"content-type": "application/x-ndjson"})
    response.request = httpx.Request("POST", "http://x/v1/rollouts")
    decoder = EventDecoder(response)
    with pytest.raises(APIStreamError) as err:
        list(decoder.feed(line))
    assert (err.value.code, err.value.type) == (503, "engine_error")


def test_disconnect_frees_the_engine_within_one_step(tiny_server: ServerProcess) -> None:
    """A client that leaves mid-stream: its 16 rows leave the engine within one step.

    The step time is measured from the stream itself (a chunk is FLUSH_EVERY steps);
    the rows must be gone within one step plus the HTTP round trips of the
    /health polls (``slack``). Left running, they would decode for many seconds.
    """
    base = tiny_server.base_url
    body = {
        "prompts": ["a", "b", "c", "d"],
        "n": 4,
        "sampling": {"max_tokens": 400, "seed": 3, "ignore_eos": True},
        "stream": True,
    }
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{base}/v1/rollouts", json=body) as r:
            lines = r.iter_lines()
            seen: dict[int, float] = {}
            while len(seen) < 2:  # two chunks of one rollout: FLUSH_EVERY steps apart
                e = json.loads(next(lines))
                if (e["prompt_index"], e["sample_index"]) == (0, 0):
                    seen[e["start"]] = time.monotonic()
            step_s = (seen[FLUSH_EVERY] - seen[0]) / FLUSH_EVERY
            assert http.get(f"{base}/health").json()["active_rollouts"] == 16
        closed = time.monotonic()  # leaving the block closed the connection
        while (active := http.get(f"{base}/health").json()["active_rollouts"]) and (
            time.monotonic() - closed < 30
        ):
            time.sleep(0.005)
        freed_s = time.monotonic() - closed
    slack = 0.25
    remaining_s = (400 - 2 * FLUSH_EVERY) * step_s
    print(
        f"step {step_s * 1e3:.1f} ms; freed after {freed_s * 1e3:.0f} ms; left {remaining_s:.1f} s"
    )
    assert active == 0
    assert remaining_s > 4 * (step_s + slack), "the test cannot tell an abort from a finish"
    assert freed_s < step_s + slack, f"rows freed after {freed_s:.2f} s, one step is {step_s:.3f} s"
    deadline = time.monotonic() + 5
    while "client disconnected" not in tiny_server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "rollout stream: client disconnected" in tiny_server.log()


def test_full_queue_refuses_a_stream_with_429(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Admission slots are taken before the stream starts (capacity 2 + 2 here)."""
    from _ops import own_server
    from dvp_client import RateLimitError

    args = ["--max-batch", "2", "--max-queue", "2", "--max-rollouts", "4"]
    with own_server(tiny_model_dir, tmp_path_factory.mktemp("stream-429"), *args) as srv:
        base = srv.base_url
        hog = {"prompts": ["a"], "n": 4, "sampling": {"max_tokens": 400, "ignore_eos": True}}
        small = {"prompts": ["b"], "sampling": {"max_tokens": 2}, "stream": True}
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", f"{base}/v1/rollouts", json={**hog, "stream": True}) as r:
                lines = r.iter_lines()  # keep it: a dropped iterator closes the connection
                assert json.loads(next(lines))["object"] == "rollout.chunk"
                refused = http.post(f"{base}/v1/rollouts", json=small)
                with Client(base, max_retries=0) as c, pytest.raises(RateLimitError):
                    next(iter(c.stream_rollouts(["b"], max_tokens=2)))
            assert refused.status_code == 429, refused.text
            assert refused.headers["retry-after"] == "1"
            assert refused.headers["content-type"].startswith("application/json")
            assert refused.json()["error"]["type"] == "rate_limit_error"
            deadline = time.monotonic() + 30
            while http.get(f"{base}/health").json()["active_rollouts"] and (
                time.monotonic() < deadline
            ):
                time.sleep(0.02)
            ok = http.post(f"{base}/v1/rollouts", json=small)
            assert ok.status_code == 200
            assert ok.text.splitlines()[-1].startswith('{"object":"rollout.summary"')
