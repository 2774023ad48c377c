"""Scale-out over replicas: ``Client([url1, url2, ...])`` and ``AsyncClient([...])``.

Three layers:

- the picker (:class:`dvp_client._replicas.ReplicaPool`) on random sequences of
  events against a naive model of the documented rules, plus the rules one by one;
- the clients over an ``httpx.MockTransport`` that plays two replicas (failover,
  what is safe to repeat, streams, weight updates), both clients per scenario;
- end to end: two real tiny torch servers on loopback, many concurrent seeded
  rollouts through one sync and one async client at once, one server SIGKILLed
  mid-run: every request returns the result a single server gives.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import inspect
import json
import logging
import math
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ServerProcess, start_server
from dvp_client import (
    APIConnectionError,
    AsyncClient,
    Client,
    ReplicaStats,
    RolloutBatch,
    ServiceUnavailableError,
)
from dvp_client import _constants as C
from dvp_client._replicas import Lease, Outcome, ReplicaPool

# -- the picker against a naive model ----------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class NaivePool:
    """The module docstring of dvp_client._replicas, written out the slow way."""

    def __init__(self, n: int, cooldown: float, max_cooldown: float) -> None:
        self.n, self.cooldown, self.max_cooldown = n, cooldown, max_cooldown
        self.out = [0] * n
        self.requests = [0] * n
        self.failures = [0] * n
        self.strikes = [0] * n
        self.until = [-math.inf] * n
        self.latencies: list[list[float]] = [[] for _ in range(n)]
        self.last_error: list[str | None] = [None] * n
        self.last_pick = -1

    def up(self, i: int, now: float) -> bool:
        return self.strikes[i] == 0 or (now >= self.until[i] and self.out[i] == 0)

    def pick(self, avoid: set[int], now: float) -> int:
        order = [(self.last_pick + 1 + k) % self.n for k in range(self.n)]  # round-robin order
        fresh = [i for i in order if self.up(i, now) and i not in avoid]
        tried = [i for i in order if self.up(i, now) and i in avoid]
        if fresh or tried:
            tier = fresh or tried
            best = tier[0]
            for i in tier:  # the first in round-robin order among the least outstanding
                if self.out[i] < self.out[best]:
                    best = i
        else:
            best = order[0]
            for i in order:
                if self.until[i] < self.until[best]:
                    best = i
        self.last_pick = best
        self.out[best] += 1
        self.requests[best] += 1
        return best

    def release(
        self, i: int, outcome: str, latency: float, now: float, retry_after: float | None
    ) -> None:
        self.out[i] -= 1
        if outcome == "ok":
            self.latencies[i].append(latency)
            self.strikes[i], self.until[i] = 0, -math.inf
        elif outcome in ("failed", "down"):
            self.failures[i] += 1
            self.last_error[i] = f"err {self.failures[i]}"
            asked = -math.inf if retry_after is None else now + retry_after
            if outcome == "down" and now >= self.until[i]:
                self.strikes[i] += 1
                backoff = min(self.cooldown * 2 ** (self.strikes[i] - 1), self.max_cooldown)
                self.until[i] = max(now + backoff, asked)
            elif outcome == "down":
                self.until[i] = max(self.until[i], asked)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_picker_matches_a_naive_model_on_random_events(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 5)
    clock = FakeClock()
    pool = ReplicaPool(
        [httpx.URL(f"http://r{i}.test") for i in range(n)],
        cooldown_s=0.5,
        max_cooldown_s=4.0,
        clock=clock,
    )
    model = NaivePool(n, 0.5, 4.0)
    live: list[Lease] = []
    outcomes: list[Outcome] = ["ok", "ok", "failed", "down", "down", "dropped"]
    picks = set()
    for step in range(600):
        event = rng.random()
        if event < 0.45 or not live:
            avoid = {i for i in range(n) if rng.random() < 0.3}
            lease = pool.acquire(avoid=avoid)
            assert lease.index == model.pick(avoid, clock.now), f"seed {seed} step {step}"
            assert lease.url == httpx.URL(f"http://r{lease.index}.test")
            live.append(lease)
            picks.add(lease.index)
        elif event < 0.9:
            lease = live.pop(rng.randrange(len(live)))
            outcome = rng.choice(outcomes)
            error = f"err {model.failures[lease.index] + 1}"
            retry_after = rng.choice([None, None, 0.2, 3.0, 10.0])
            pool.release(lease, outcome, error, retry_after)
            model.release(lease.index, outcome, clock.now - lease.started, clock.now, retry_after)
        else:
            clock.now += rng.choice([0.1, 0.3, 1.0, 5.0])
        stats = pool.stats()
        for i, s in enumerate(stats):
            want_lat = model.latencies[i]
            assert (s.outstanding, s.requests, s.failures) == (
                model.out[i],
                model.requests[i],
                model.failures[i],
            ), f"seed {seed} step {step} replica {i}"
            assert s.healthy == (model.strikes[i] == 0)
            assert s.last_error == model.last_error[i]
            until = model.until[i] if model.until[i] > clock.now else None
            assert s.cooldown_until == until
            if want_lat:
                assert s.mean_latency_s == pytest.approx(sum(want_lat) / len(want_lat))
            else:
                assert s.mean_latency_s is None
    assert picks == set(range(n))  # the sequences exercise every replica


def test_round_robin_on_ties_and_least_outstanding() -> None:
    pool = ReplicaPool([httpx.URL(f"http://r{i}.test") for i in range(3)])
    leases = [pool.acquire() for _ in range(6)]
    assert [le.index for le in leases] == [0, 1, 2, 0, 1, 2]
    pool.release(leases[4], "ok")  # replica 1 now has the fewest outstanding
    assert pool.acquire().index == 1
    assert pool.acquire().index == 2  # all tied at 2 again: round-robin goes on after 1
    assert pool.acquire().index == 0


def test_cooldown_then_one_probe_then_doubling() -> None:
    clock = FakeClock()
    pool = ReplicaPool([httpx.URL("http://a.test"), httpx.URL("http://b.test")], clock=clock)
    a = pool.acquire()
    assert a.index == 0
    others = [pool.acquire() for _ in range(3)]  # b, a, b
    pool.release(a, "down", "ConnectError('refused')")
    pool.release(others[1], "down", "ReadError('reset')")  # the same crash: no second strike
    stats = pool.stats()[0]
    assert not stats.healthy and stats.failures == 2 and stats.last_error == "ReadError('reset')"
    assert stats.cooldown_until == clock.now + C.REPLICA_COOLDOWN
    assert [pool.acquire().index for _ in range(4)] == [1] * 4  # a sits out its cooldown
    clock.now += C.REPLICA_COOLDOWN
    probe = pool.acquire()
    assert probe.index == 0  # the probe (a has nothing outstanding, b has 6)
    assert pool.acquire().index == 1  # one probe at a time
    pool.release(probe, "down", "ConnectError('refused')")
    assert pool.stats()[0].cooldown_until == clock.now + 2 * C.REPLICA_COOLDOWN
    clock.now += 2 * C.REPLICA_COOLDOWN
    probe = pool.acquire()
    assert probe.index == 0
    clock.now += 0.25
    pool.release(probe, "ok")
    stats = pool.stats()[0]
    assert stats.healthy and stats.cooldown_until is None and stats.mean_latency_s == 0.25


def test_retry_after_lengthens_a_cooldown() -> None:
    clock = FakeClock()
    pool = ReplicaPool([httpx.URL("http://a.test"), httpx.URL("http://b.test")], clock=clock)
    first, second = pool.acquire(pin=0), pool.acquire(pin=0)
    pool.release(first, "down", "status 503", retry_after=0.1)  # shorter: the backoff wins
    assert pool.stats()[0].cooldown_until == clock.now + C.REPLICA_COOLDOWN
    pool.release(second, "down", "status 503", retry_after=20.0)  # "back in 20 s"
    assert pool.stats()[0].cooldown_until == clock.now + 20.0


def test_every_replica_down_picks_the_soonest_back() -> None:
    clock = FakeClock()
    pool = ReplicaPool([httpx.URL(f"http://r{i}.test") for i in range(3)], clock=clock)
    leases = [pool.acquire() for _ in range(3)]
    for le in (leases[1], leases[2], leases[0]):
        pool.release(le, "down", "x")
        clock.now += 0.1
    assert pool.acquire().index == 1  # cooled down first
    assert pool.acquire(pin=2).index == 2  # a pin ignores the state


def test_pool_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ReplicaPool([])
    with pytest.raises(ValueError, match="cooldown"):
        ReplicaPool([httpx.URL("http://a.test")], cooldown_s=0.0)
    with pytest.raises(ValueError, match="absolute"):
        Client(["http://a.test", "localhost:1"])
    with pytest.raises(ValueError, match=r"base_url\[1\] must be an absolute"):
        Client(["http://a.test", "b.test"])
    with pytest.raises(ValueError, match=r"base_url\[2\] repeats base_url\[0\]"):
        Client(["http://a.test", "http://b.test", "http://a.test/"])
    with pytest.raises(ValueError, match="empty list"):
        Client([])
    c = Client(["http://a.test/", httpx.URL("http://b.test")])
    assert str(c.base_url) == "http://a.test" and len(c.base_urls) == 2
    assert repr(c) == "Client(['http://a.test', 'http://b.test'])"
    assert repr(Client("http://a.test")) == "Client('http://a.test')"


# -- the clients over a mock transport playing two replicas ------------------------------

A, B = "http://a.test:1", "http://b.test:2"


def batch_json(seed: int = 11) -> dict[str, Any]:
    rollout = {
        "prompt_index": 0,
        "sample_index": 0,
        "prompt_token_ids": [1, 2],
        "token_ids": [5, 6],
        "masked_logprobs": [-0.05, -0.1],
        "safe_sizes": [2, 3],
        "finish_reason": "length",
        "policy_version": 0,
        "seed": seed,
    }
    usage = {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    return {
        "id": "req",
        "model": "m",
        "engine": "torch",
        "temperature": 1.0,
        "pruning": {"min_p": 0.001},
        "policy_version": 0,
        "rollouts": [rollout],
        "usage": usage,
    }


def weights_json(version: int) -> dict[str, Any]:
    return {
        "policy_version": version,
        "source": "path:w",
        "loaded_at": "2026-11-25T00:00:00Z",
        "num_tensors": 3,
        "on_inflight": "drain",
        "previous_version": version - 1,
        "aborted_rollouts": 0,
        "drained_rollouts": 0,
        "wait_s": 0.0,
        "load_s": 0.1,
    }


class Replicas:
    """Two mock replicas behind one client (sync or async); ``behave[host]`` answers."""

    def __init__(self, kind: str, behave: dict[str, Callable[[httpx.Request], Any]]) -> None:
        self.kind = kind
        self.seen: list[tuple[str, httpx.Request]] = []
        self.sleeps: list[float] = []

        def handle(request: httpx.Request) -> httpx.Response:
            request.read()
            host = request.url.host
            self.seen.append((host, request))
            reply = behave[host](request)
            if isinstance(reply, Exception):
                raise reply
            assert isinstance(reply, httpx.Response)
            if isinstance(reply.stream, CutStream):
                return reply
            # a fresh copy: a parametrized response is used by both clients
            return httpx.Response(reply.status_code, headers=reply.headers, content=reply.content)

        transport = httpx.MockTransport(handle)
        if kind == "sync":
            self.client: Any = Client([A, B], http_client=httpx.Client(transport=transport))
            self.client._sleep = self.sleeps.append
        else:

            async def sleep(seconds: float) -> None:
                self.sleeps.append(seconds)

            http = httpx.AsyncClient(transport=transport)
            self.client = AsyncClient([A, B], http_client=http)
            self.client._sleep = sleep

    def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.client, method)(*args, **kwargs)
        return asyncio.run(result) if inspect.iscoroutine(result) else result

    def hosts(self) -> list[str]:
        return [h for h, _ in self.seen]

    def stats(self) -> list[ReplicaStats]:
        return list(self.client.replica_stats())


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def ok(_: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json=batch_json())


def test_requests_alternate_over_idle_replicas(kind: str) -> None:
    r = Replicas(kind, {"a.test": ok, "b.test": ok})
    for _ in range(4):
        r("rollouts", ["x"])
    assert r.hosts() == ["a.test", "b.test", "a.test", "b.test"]
    stats = r.stats()
    assert [(s.url, s.requests, s.failures, s.outstanding) for s in stats] == [
        (A, 2, 0, 0),
        (B, 2, 0, 0),
    ]
    assert all(s.healthy and s.mean_latency_s is not None for s in stats)


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("refused"),
        httpx.ConnectTimeout("slow to connect"),
        httpx.RemoteProtocolError("server disconnected"),
        httpx.Response(503, json={"error": {"type": "unavailable", "message": "starting"}}),
    ],
    ids=["connect", "connect-timeout", "disconnect", "503"],
)
def test_seeded_rollout_fails_over_at_once(kind: str, failure: Any) -> None:
    r = Replicas(kind, {"a.test": lambda _: failure, "b.test": ok})
    batch = r("rollouts", ["x"], n=1)
    assert isinstance(batch, RolloutBatch)
    assert r.hosts() == ["a.test", "b.test"] and r.sleeps == []  # no backoff: B was up
    first, second = (req for _, req in r.seen)
    assert first.content == second.content  # the same seed on both replicas
    assert first.headers[C.REQUEST_ID_HEADER] == second.headers[C.REQUEST_ID_HEADER]
    a, b = r.stats()
    assert (a.requests, a.failures, a.healthy, b.requests, b.failures) == (1, 1, False, 1, 0)
    assert a.cooldown_until is not None and a.last_error is not None
    assert a.cooldown_until <= time.monotonic() + C.REPLICA_COOLDOWN
    r("rollouts", ["x"])
    r("rollouts", ["x"])
    assert r.hosts()[2:] == ["b.test", "b.test"]  # A cools down


def test_a_503_retry_after_keeps_its_replica_out(kind: str) -> None:
    restarting = httpx.Response(503, headers={"Retry-After": "20"})
    r = Replicas(kind, {"a.test": lambda _: restarting, "b.test": ok})
    r("rollouts", ["x"])
    assert r.hosts() == ["a.test", "b.test"] and r.sleeps == []  # its Retry-After: not ours
    until = r.stats()[0].cooldown_until
    assert until is not None and 19.0 < until - time.monotonic() <= 20.0


def test_unseeded_rollout_fails_over_only_when_nothing_was_sent(kind: str) -> None:
    r = Replicas(kind, {"a.test": lambda _: httpx.ConnectError("refused"), "b.test": ok})
    r("rollouts", ["x"], seed=None)
    assert r.hosts() == ["a.test", "b.test"]
    for failure in (httpx.ReadError("reset"), httpx.Response(503)):
        r = Replicas(kind, {"a.test": lambda _, f=failure: f, "b.test": ok})
        with pytest.raises((APIConnectionError, ServiceUnavailableError)):
            r("rollouts", ["x"], seed=None)  # it may have run on A: not run again
        assert r.hosts() == ["a.test"]


def test_retry_budget_counts_failovers(kind: str) -> None:
    down = {
        "a.test": lambda _: httpx.ConnectError("a"),
        "b.test": lambda _: httpx.ConnectError("b"),
    }
    r = Replicas(kind, down)
    r.client.max_retries = 2
    with pytest.raises(APIConnectionError):
        r("rollouts", ["x"])
    assert r.hosts() == ["a.test", "b.test", "a.test"]  # 1 attempt + 2 retries
    assert len(r.sleeps) == 1  # the failover to B was at once; back to A after a backoff
    r = Replicas(kind, down)
    r.client.max_retries = 0
    with pytest.raises(APIConnectionError):
        r("rollouts", ["x"])
    assert r.hosts() == ["a.test"]


CHUNK = {
    "object": "rollout.chunk",
    "prompt_index": 0,
    "sample_index": 0,
    "start": 0,
    "token_ids": [5, 6],
    "masked_logprobs": [-0.1, -0.2],
    "safe_sizes": [2, 1],
    "policy_version": 0,
    "finish_reason": "length",
}
SUMMARY = {
    "object": "rollout.summary",
    **{k: v for k, v in batch_json().items() if k != "rollouts"},
    "rollouts": [
        {
            "prompt_index": 0,
            "sample_index": 0,
            "prompt_token_ids": [1],
            "num_tokens": 2,
            "finish_reason": "length",
            "policy_version": 0,
        }
    ],
}


class CutStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A 200 body that sends its first line, then the connection breaks."""

    def __iter__(self) -> Iterator[bytes]:
        yield json.dumps(CHUNK).encode() + b"\n"
        raise httpx.ReadError("connection reset mid-stream")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield json.dumps(CHUNK).encode() + b"\n"
        raise httpx.ReadError("connection reset mid-stream")


def drain(r: Replicas, **kwargs: Any) -> list[Any]:
    """Every event of ``stream_rollouts(["x"], **kwargs)``, with either client."""
    events = r.client.stream_rollouts(["x"], **kwargs)
    if r.kind == "sync":
        return list(events)

    async def collect() -> list[Any]:
        return [e async for e in events]

    return asyncio.run(collect())


def test_stream_fails_over_before_its_first_byte(kind: str) -> None:
    body = b"".join(json.dumps(e).encode() + b"\n" for e in (CHUNK, SUMMARY))
    stream = httpx.Response(200, content=body, headers={"content-type": "application/x-ndjson"})
    r = Replicas(
        kind, {"a.test": lambda _: httpx.ConnectError("refused"), "b.test": lambda _: stream}
    )
    events = drain(r)
    assert [e.object for e in events] == ["rollout.chunk", "rollout.summary"]
    assert r.hosts() == ["a.test", "b.test"]
    assert [(s.outstanding, s.failures) for s in r.stats()] == [(0, 1), (0, 0)]


def test_stream_is_not_failed_over_after_its_first_byte(kind: str) -> None:
    def cut(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=CutStream(), headers={"content-type": "x-ndjson"})

    r = Replicas(kind, {"a.test": cut, "b.test": ok})
    with pytest.raises(httpx.ReadError):
        drain(r)
    assert r.hosts() == ["a.test"]  # B never saw it: the stream had begun
    a, b = r.stats()
    assert (a.outstanding, a.failures, a.healthy, b.requests) == (0, 1, False, 0)


def test_an_open_stream_holds_its_replica(kind: str) -> None:
    body = b"".join(json.dumps(e).encode() + b"\n" for e in (CHUNK, SUMMARY))
    stream = httpx.Response(200, content=body, headers={"content-type": "application/x-ndjson"})
    r = Replicas(kind, {"a.test": lambda _: stream, "b.test": ok})
    if kind == "sync":
        events = r.client.stream_rollouts(["x"])
        next(events)
        assert [s.outstanding for s in r.stats()] == [1, 0]
        r("rollouts", ["x"])  # goes to B, the less loaded
        events.close()  # leaving the loop early gives A back, as a drop
    else:

        async def run() -> None:
            events = r.client.stream_rollouts(["x"])
            await events.__anext__()
            assert [s.outstanding for s in r.stats()] == [1, 0]
            await r.client.rollouts(["x"])
            await events.aclose()

        asyncio.run(run())
    assert r.hosts() == ["a.test", "b.test"]
    assert [(s.outstanding, s.failures) for s in r.stats()] == [(0, 0), (0, 0)]


def test_a_cancelled_request_gives_its_replica_back() -> None:
    async def run() -> list[ReplicaStats]:
        started = asyncio.Event()

        async def slow(request: httpx.Request) -> httpx.Response:
            started.set()
            await asyncio.sleep(30)
            return httpx.Response(200, json=batch_json())

        transport = httpx.MockTransport(slow)
        async with AsyncClient([A, B], http_client=httpx.AsyncClient(transport=transport)) as c:
            task = asyncio.create_task(c.rollouts(["x"]))
            await started.wait()
            assert [s.outstanding for s in c.replica_stats()] == [1, 0]
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return c.replica_stats()

    stats = asyncio.run(run())
    assert [(s.outstanding, s.requests, s.failures) for s in stats] == [(0, 1, 0), (0, 0, 0)]


def test_update_weights_goes_to_every_replica_once(kind: str) -> None:
    versions = {"a.test": 4, "b.test": 7}
    r = Replicas(
        kind,
        {
            h: (lambda _, v=v: httpx.Response(200, json=weights_json(v)))
            for h, v in versions.items()
        },
    )
    replies = r("update_weights", Path("step-1"), on_inflight="abort", drain_timeout_s=5.0)
    assert [x.policy_version for x in replies] == [4, 7]
    assert r.hosts() == ["a.test", "b.test"]
    for _, req in r.seen:
        assert (req.method, req.url.path) == ("POST", "/v1/weights")
        assert json.loads(req.content) == {
            "path": "step-1",
            "on_inflight": "abort",
            "drain_timeout_s": 5.0,
        }
    # a weight update is not repeated once it may have run, nor sent elsewhere
    r = Replicas(kind, {"a.test": lambda _: httpx.Response(503), "b.test": ok})
    with pytest.raises(ServiceUnavailableError):
        r("update_weights", "step-1")
    assert r.hosts() == ["a.test"]
    # ... but a connect error is retried on the same replica (it never arrived)
    calls = iter([httpx.ConnectError("refused"), httpx.Response(200, json=weights_json(1))])
    r = Replicas(
        kind,
        {
            "a.test": lambda _: next(calls),
            "b.test": lambda _: httpx.Response(200, json=weights_json(1)),
        },
    )
    assert [x.policy_version for x in r("update_weights", "w")] == [1, 1]
    assert r.hosts() == ["a.test", "a.test", "b.test"] and len(r.sleeps) == 1


def test_rollouts_methods_share_one_signature() -> None:
    """The shells hold only signatures; the core reads each parameter by name."""
    ref = inspect.signature(Client.rollouts).parameters
    for fn in (Client.stream_rollouts, AsyncClient.rollouts, AsyncClient.stream_rollouts):
        assert inspect.signature(fn).parameters == ref, fn.__qualname__


# -- end to end: two real servers, one killed mid-run -------------------------------------

N_SYNC = N_ASYNC = 16  # requests per client; each: 1 prompt, n = 2, 16 tokens
KILL_AFTER = 6  # results returned (both clients together) before replica A is SIGKILLed


def pair_args(weights_root: Path) -> list[str]:
    """Tiny-model server flags. ``--max-batch 2`` = one request's rollouts: each request
    decodes alone, so its numbers do not depend on what else the server is running."""
    return [
        "--engine", "torch", "--threads", "1", "--max-batch", "2",
        "--weights-root", str(weights_root), "--log-level", "warning",
    ]  # fmt: skip


def seeded(i: int) -> dict[str, Any]:
    """The i-th request's arguments (a seed of its own)."""
    prompt = f"Request {i}: what is {i} times 7?"
    return {"prompts": [prompt], "n": 2, "max_tokens": 16, "ignore_eos": True, "seed": 1000 + i}


def same_result(got: RolloutBatch, want: RolloutBatch, i: int) -> None:
    assert len(got.rollouts) == len(want.rollouts) == 2, f"request {i}"
    for g, w in zip(got.rollouts, want.rollouts, strict=True):
        assert g.token_ids == w.token_ids and len(g.token_ids) == 16, f"request {i}"
        assert g.masked_logprobs == pytest.approx(w.masked_logprobs, abs=1e-6), f"request {i}"
        assert g.safe_sizes == w.safe_sizes and g.seed == w.seed, f"request {i}"
        assert g.policy_version == 1, f"request {i}: not served by the updated weights"


@pytest.mark.slow  # 47-94 s at load 10-15 on 2 cores, mostly starting 2 servers; ~9 s after
def test_two_servers_one_killed_mid_run_loses_no_request(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    args = pair_args(tiny_model_dir.parent)
    with cf.ThreadPoolExecutor(2) as ex:  # start both at once
        starts = [
            ex.submit(start_server, str(tiny_model_dir), tmp_path / f"{n}.log", args, 120.0)
            for n in "ab"
        ]
        servers = [f.result() for f in starts]
    a, b = servers
    try:
        # Both replicas load the same weights (policy_version 0 -> 1) through one call.
        with Client([a.base_url, b.base_url], timeout=60) as c:
            replies = c.update_weights(tiny_model_dir / "model.safetensors")
        assert [r.policy_version for r in replies] == [1, 1]

        # Reference: every request on replica A alone.
        n_all = N_SYNC + N_ASYNC
        with Client(a.base_url, timeout=60) as ref_client, cf.ThreadPoolExecutor(4) as ex:
            reference = list(ex.map(lambda i: ref_client.rollouts(**seeded(i)), range(n_all)))

        caplog.set_level(logging.INFO, logger="dvp_client")
        results, stats = run_both_clients_and_kill(a, b, n_all)
    finally:
        for s in servers:
            s.proc.kill()
            s.proc.wait()

    assert sorted(results) == list(range(n_all))  # no request lost
    for i, want in enumerate(reference):
        same_result(results[i], want, i)
    # Both replicas served requests; the killed one failed, the other never did.
    for name, (sa, sb) in stats.items():
        assert sa.url == a.base_url and sb.url == b.base_url
        assert sa.requests > 0 and sb.requests > 0, name
        assert sa.failures > 0 and not sa.healthy and sa.last_error is not None, name
        assert sb.failures == 0 and sb.healthy, name
        assert sa.outstanding == sb.outstanding == 0, name
    # every request answered exactly once; replica A answered some before it died
    answered_a = sum(s[0].requests - s[0].failures for s in stats.values())
    answered_b = sum(s[1].requests - s[1].failures for s in stats.values())
    assert answered_a + answered_b == n_all and answered_a > 0
    # the kill caught requests in flight on A (not only refused connections later)
    cut = [r.getMessage() for r in caplog.records if "on another replica" in r.getMessage()]
    assert any("ConnectError" not in m for m in cut), cut


def run_both_clients_and_kill(
    a: ServerProcess, b: ServerProcess, n_all: int
) -> tuple[dict[int, RolloutBatch], dict[str, tuple[ReplicaStats, ...]]]:
    """Requests 0..N_SYNC-1 through a sync Client (8 threads) while the rest go through
    an AsyncClient (all at once), both over [A, B]; A is SIGKILLed after KILL_AFTER
    results. Returns every result by request index, and each client's stats."""
    urls = [a.base_url, b.base_url]
    results: dict[int, RolloutBatch] = {}
    done = threading.Condition()

    def record(i: int, batch: RolloutBatch) -> None:
        with done:
            results[i] = batch
            done.notify_all()

    def killer() -> None:
        with done:
            done.wait_for(lambda: len(results) >= KILL_AFTER, timeout=60)
        a.proc.kill()  # SIGKILL: no graceful shutdown, in-flight requests are cut

    async def run_async() -> tuple[ReplicaStats, ...]:
        async with AsyncClient(urls, timeout=60) as ac:

            async def one(i: int) -> None:
                record(i, await ac.rollouts(**seeded(i)))

            await asyncio.gather(*(one(i) for i in range(N_SYNC, n_all)))
            return tuple(ac.replica_stats())

    kill_thread = threading.Thread(target=killer)
    kill_thread.start()
    with Client(urls, timeout=60) as sc, cf.ThreadPoolExecutor(8) as ex:
        futures = [
            ex.submit(lambda i=i: record(i, sc.rollouts(**seeded(i)))) for i in range(N_SYNC)
        ]
        async_stats = asyncio.run(run_async())
        for f in futures:
            f.result()
        sync_stats = tuple(sc.replica_stats())
    kill_thread.join()
    return results, {"sync": sync_stats, "async": async_stats}
