"""Unit tests of the HTTP client (``Client`` and ``AsyncClient``) over httpx.MockTransport.

Every scenario runs against both clients (the ``kind`` fixture). The transport is
the seam: a handler plays the server, records every attempt, and may fail the
first attempts. Sleeps are recorded instead of slept. The end-to-end tests
against a real server live in tests/test_e2e_*.py.
"""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import json
import random
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import dvp_client
import httpx
import pydantic
import pytest
from dvp_client import (
    NOT_GIVEN,
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConflictError,
    InternalServerError,
    NotFoundError,
    NotGiven,
    PayloadTooLargeError,
    PermissionDeniedError,
    PruningRule,
    RateLimitError,
    RolloutBatch,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from dvp_client import _constants as C
from dvp_client._base import backoff_delay, parse_retry_after

BASE = "http://dvp.test:8000"

Reply = httpx.Response | Exception
Handler = Callable[[httpx.Request], Reply]


def rollout_json(prompt_index: int = 0, sample_index: int = 0) -> dict[str, Any]:
    return {
        "prompt_index": prompt_index,
        "sample_index": sample_index,
        "prompt_token_ids": [1, 2],
        "token_ids": [5, 6, 7],
        "text": "56",
        "logprobs": [-0.1, -0.2, -0.3],
        "masked_logprobs": [-0.05, -0.1, -0.2],
        "safe_logmass": [-0.05, -0.1, -0.1],
        "safe_sizes": [2, 3, 1],
        "safe_token_ids": {"ids": [5, 9, 1, 6, 8, 7], "offsets": [0, 2, 5, 6]},
        "finish_reason": "length",
        "policy_version": 3,
        "seed": 11,
    }


def batch_json(n: int = 1) -> dict[str, Any]:
    return {
        "id": "req-1",
        "model": "smollm2",
        "engine": "torch",
        "temperature": 1.0,
        "pruning": {"min_p": 0.001},
        "policy_version": 3,
        "rollouts": [rollout_json(0, j) for j in range(n)],
        "usage": {"prompt_tokens": 2, "completion_tokens": 3 * n, "total_tokens": 2 + 3 * n},
    }


def error_json(status: int, type_: str = "invalid_request_error", param: str | None = None) -> dict:
    return {
        "error": {"type": type_, "message": f"bad thing {status}", "param": param, "code": status}
    }


def ok(_: httpx.Request | None = None) -> httpx.Response:
    return httpx.Response(200, json=batch_json())


class Harness:
    """One client (sync or async) over a MockTransport; calls look synchronous here.

    Attributes:
        requests: Every attempt the transport saw, in order.
        sleeps: Every backoff delay the client asked for, in order (nothing sleeps).
    """

    def __init__(self, kind: str, replies: Sequence[Reply] | Handler, **client_kw: Any) -> None:
        self.requests: list[httpx.Request] = []
        self.sleeps: list[float] = []
        script = None if callable(replies) else list(replies)

        def handle(request: httpx.Request) -> httpx.Response:
            request.read()
            self.requests.append(request)
            reply = replies(request) if script is None else script.pop(0)  # type: ignore[operator]
            if isinstance(reply, Exception):
                raise reply
            # a fresh copy: a script may list the same response several times
            return httpx.Response(reply.status_code, headers=reply.headers, content=reply.content)

        self.client = self._make_client(kind, httpx.MockTransport(handle), client_kw)

    def _make_client(self, kind: str, transport: httpx.MockTransport, kw: dict[str, Any]) -> Any:
        client: Any
        if kind == "sync":
            client = Client(BASE, http_client=httpx.Client(transport=transport), **kw)
            client._sleep = self.sleeps.append
            return client

        async def sleep(seconds: float) -> None:
            self.sleeps.append(seconds)

        client = AsyncClient(BASE, http_client=httpx.AsyncClient(transport=transport), **kw)
        client._sleep = sleep
        return client

    def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.client, method)(*args, **kwargs)
        return asyncio.run(result) if inspect.iscoroutine(result) else result

    def body(self, i: int = -1) -> Any:
        return json.loads(self.requests[i].content)


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(C.API_KEY_ENV, raising=False)
    monkeypatch.delenv(C.BASE_URL_ENV, raising=False)
    yield


def connect_error(message: str = "connection refused") -> httpx.ConnectError:
    return httpx.ConnectError(message)


# -- the request body ---------------------------------------------------------------


def test_issue_example_body_and_result(kind: str) -> None:
    h = Harness(kind, ok)
    batch = h("rollouts", ["What is 7*8?"], n=4, max_tokens=64, pruning={"min_p": 1e-3})
    req = h.requests[0]
    assert (req.method, str(req.url)) == ("POST", f"{BASE}/v1/rollouts")
    assert req.headers["content-type"] == "application/json"
    body = h.body()
    seed = body["sampling"].pop("seed")
    assert isinstance(seed, int) and 0 <= seed < 2**63
    assert body == {
        "prompts": ["What is 7*8?"],
        "n": 4,
        "sampling": {"max_tokens": 64},  # NOT_GIVEN fields are left to the server
        "pruning": {"min_p": 1e-3},
        "return_safe_token_ids": False,
        "return_text": True,
    }
    assert isinstance(batch, RolloutBatch)
    r = batch.rollouts[0]
    assert r.token_ids == [5, 6, 7] and r.masked_logprobs == [-0.05, -0.1, -0.2]
    assert r.safe_sizes == [2, 3, 1] and r.safe_token_ids is not None
    assert r.safe_token_ids.step(1) == [1, 6, 8]
    assert (r.policy_version, r.finish_reason, r.logprobs, r.safe_logmass) == (
        3,
        "length",
        [-0.1, -0.2, -0.3],
        [-0.05, -0.1, -0.1],
    )


def test_every_argument_reaches_the_body(kind: str) -> None:
    h = Harness(kind, ok)
    chat = [{"role": "user", "content": "hi"}]
    h(
        "rollouts",
        ["a", [1, 2, 3], chat],
        n=2,
        temperature=0.7,
        max_tokens=9,
        stop="\n",
        stop_token_ids=[2],
        seed=123,
        ignore_eos=True,
        pruning=PruningRule(min_p=0.01, top_k=20),
        return_safe_token_ids=True,
        return_text=False,
        model="smollm2",
    )
    assert h.body() == {
        "prompts": ["a", [1, 2, 3], chat],
        "n": 2,
        "sampling": {
            "temperature": 0.7,
            "max_tokens": 9,
            "stop": ["\n"],
            "stop_token_ids": [2],
            "seed": 123,
            "ignore_eos": True,
        },
        "pruning": {"min_p": 0.01, "top_k": 20},
        "return_safe_token_ids": True,
        "safe_token_ids_format": "packed",  # the client asks for packed sets
        "return_text": False,
        "model": "smollm2",
    }


def test_bare_string_prompt_is_one_prompt(kind: str) -> None:
    h = Harness(kind, ok)
    h("rollouts", "What is 7*8?", pruning=None)
    body = h.body()
    assert body["prompts"] == ["What is 7*8?"]
    assert "pruning" not in body and "model" not in body


@pytest.mark.parametrize(
    ("kwargs", "loc"),
    [
        ({"pruning": {"min_p": 2.0}}, ("pruning", "min_p")),
        ({"pruning": {"min_pp": 0.1}}, ("pruning", "min_pp")),
        ({"n": 0}, ("n",)),
        ({"temperature": -1.0}, ("sampling", "temperature")),
        ({"max_tokens": 0}, ("sampling", "max_tokens")),
        ({"seed": -5}, ("sampling", "seed")),
        ({"stop": [""]}, ("sampling", "stop")),
        ({"prompts": [""]}, ("prompts",)),
        ({"prompts": []}, ("prompts",)),
    ],
)
def test_bad_arguments_fail_before_the_network(
    kind: str, kwargs: dict[str, Any], loc: tuple[str, ...]
) -> None:
    h = Harness(kind, ok)
    kwargs = dict(kwargs)  # the parameter dict is shared by the sync and async runs
    prompts = kwargs.pop("prompts", ["x"])
    with pytest.raises(pydantic.ValidationError) as info:
        h("rollouts", prompts, **kwargs)
    assert any(err["loc"][: len(loc)] == loc for err in info.value.errors()), info.value
    assert h.requests == []


# -- retries ------------------------------------------------------------------------


def test_connection_errors_are_retried_with_the_same_request(kind: str) -> None:
    h = Harness(kind, [connect_error(), connect_error(), ok()])
    batch = h("rollouts", ["x"], n=2)
    assert batch.rollouts[0].token_ids == [5, 6, 7]
    assert len(h.requests) == 3 and len(h.sleeps) == 2
    bodies = {r.content for r in h.requests}
    assert len(bodies) == 1  # same body, so the same seed, on every attempt
    assert len({r.headers[C.REQUEST_ID_HEADER] for r in h.requests}) == 1


def test_connection_error_after_the_last_retry(kind: str) -> None:
    cause = connect_error("refused")
    h = Harness(kind, [cause, cause, cause, ok()], max_retries=2)
    with pytest.raises(APIConnectionError) as info:
        h("rollouts", ["x"])
    assert type(info.value) is APIConnectionError
    assert info.value.__cause__ is cause
    assert info.value.request is h.requests[-1]
    assert len(h.requests) == 3 and len(h.sleeps) == 2


def test_timeout_is_an_api_timeout_error(kind: str) -> None:
    cause = httpx.ReadTimeout("slow")
    h = Harness(kind, [cause], max_retries=0)
    with pytest.raises(APITimeoutError) as info:
        h("rollouts", ["x"])
    assert isinstance(info.value, APIConnectionError) and info.value.__cause__ is cause
    assert len(h.requests) == 1 and h.sleeps == []


def test_real_refused_connection(kind: str) -> None:
    """No mock: a port nothing listens on, through httpx's real transport."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cls = Client if kind == "sync" else AsyncClient
    client: Any = cls(f"http://127.0.0.1:{port}", max_retries=1)
    sleeps: list[float] = []
    if kind == "sync":
        client._sleep = sleeps.append
    else:

        async def sleep(seconds: float) -> None:
            sleeps.append(seconds)

        client._sleep = sleep

    async def run_async() -> None:
        async with client:
            await client.health()

    with pytest.raises(APIConnectionError) as info:
        if kind == "sync":
            with client:
                client.health()
        else:
            asyncio.run(run_async())
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert len(sleeps) == 1


@pytest.mark.parametrize(
    ("header", "value", "expected"),
    [
        ("Retry-After", "3", 3.0),
        ("Retry-After", "0.25", 0.25),
        ("Retry-After", "1000", C.MAX_RETRY_AFTER),
        ("Retry-After", "-4", 0.0),
        ("retry-after-ms", "1500", 1.5),
    ],
)
def test_429_honours_retry_after(kind: str, header: str, value: str, expected: float) -> None:
    busy = httpx.Response(429, headers={header: value}, json=error_json(429, "rate_limit_error"))
    h = Harness(kind, [busy, ok()])
    h("rollouts", ["x"])
    assert len(h.requests) == 2
    assert h.sleeps == [pytest.approx(expected)]


def test_retry_after_as_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert parse_retry_after(httpx.Headers({"Retry-After": when})) == pytest.approx(30, abs=2)
    assert parse_retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    assert parse_retry_after(httpx.Headers({"Retry-After": "nan"})) is None
    assert parse_retry_after(httpx.Headers({})) is None


def test_429_without_retry_after_backs_off(kind: str) -> None:
    busy = httpx.Response(429, json=error_json(429, "rate_limit_error"))
    h = Harness(kind, [busy, busy, busy])
    with pytest.raises(RateLimitError) as info:
        h("rollouts", ["x"])
    assert info.value.status_code == 429 and info.value.type == "rate_limit_error"
    assert len(h.requests) == 3
    lo = 1 - C.RETRY_JITTER
    assert lo * 0.5 <= h.sleeps[0] <= 0.5 and lo * 1.0 <= h.sleeps[1] <= 1.0


@pytest.mark.parametrize("status", [408, 409, 500, 502, 503, 504])
def test_retryable_statuses(kind: str, status: int) -> None:
    h = Harness(kind, [httpx.Response(status, json=error_json(status)), ok()])
    h("rollouts", ["x"])
    assert len(h.requests) == 2 and len(h.sleeps) == 1


def test_503_until_the_retries_run_out(kind: str) -> None:
    down = httpx.Response(
        503, headers={C.REQUEST_ID_HEADER: "srv-9"}, json=error_json(503, "engine_unavailable")
    )
    h = Harness(kind, [down] * 4, max_retries=3)
    with pytest.raises(ServiceUnavailableError) as info:
        h("rollouts", ["x"])
    err = info.value
    assert isinstance(err, InternalServerError)
    assert (err.status_code, err.type, err.request_id) == (503, "engine_unavailable", "srv-9")
    assert len(h.requests) == 4 and len(h.sleeps) == 3


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_client_errors_are_not_retried(kind: str, status: int) -> None:
    h = Harness(kind, [httpx.Response(status, json=error_json(status)), ok()])
    with pytest.raises(APIStatusError):
        h("rollouts", ["x"])
    assert len(h.requests) == 1 and h.sleeps == []


def test_backoff_is_capped(kind: str) -> None:
    h = Harness(kind, [httpx.Response(500)] * 9, max_retries=8)
    with pytest.raises(InternalServerError):
        h("rollouts", ["x"])
    assert len(h.sleeps) == 8
    for i, delay in enumerate(h.sleeps):
        base = min(C.INITIAL_RETRY_DELAY * 2**i, C.MAX_RETRY_DELAY)
        assert base * (1 - C.RETRY_JITTER) <= delay <= base, (i, delay)
    assert max(h.sleeps) <= C.MAX_RETRY_DELAY
    assert min(h.sleeps[4:]) >= C.MAX_RETRY_DELAY * (1 - C.RETRY_JITTER)  # the cap was reached


def test_backoff_formula_bounds() -> None:
    class Fixed(random.Random):
        def __init__(self, u: float) -> None:
            super().__init__()
            self.u = u

        def random(self) -> float:
            return self.u

    assert backoff_delay(0, Fixed(0.0)) == C.INITIAL_RETRY_DELAY
    assert backoff_delay(3, Fixed(0.0)) == 4.0
    assert backoff_delay(50, Fixed(0.0)) == C.MAX_RETRY_DELAY
    assert backoff_delay(50, Fixed(0.999999)) == pytest.approx(C.MAX_RETRY_DELAY * 0.75, rel=1e-5)


def test_max_retries_zero_and_negative(kind: str) -> None:
    h = Harness(kind, [httpx.Response(503)], max_retries=0)
    with pytest.raises(ServiceUnavailableError):
        h("rollouts", ["x"])
    assert len(h.requests) == 1
    with pytest.raises(ValueError, match="max_retries must be >= 0, got -1"):
        Client(BASE, max_retries=-1)


# -- seeds: retries are safe to repeat ----------------------------------------------------


def test_seed_is_fixed_across_retries(kind: str) -> None:
    replies = [httpx.Response(500), httpx.Response(503), ok(), ok()]
    h = Harness(kind, replies)
    h("rollouts", ["x"], n=4)
    seeds = [json.loads(r.content)["sampling"]["seed"] for r in h.requests]
    assert len(seeds) == 3 and len(set(seeds)) == 1 and isinstance(seeds[0], int)
    h("rollouts", ["x"], n=4)  # a new call draws a new seed
    assert h.body()["sampling"]["seed"] != seeds[0]


def test_explicit_seed_is_sent(kind: str) -> None:
    h = Harness(kind, [httpx.Response(500), ok()])
    h("rollouts", ["x"], seed=2**63 - 1)
    assert [json.loads(r.content)["sampling"]["seed"] for r in h.requests] == [2**63 - 1] * 2


def test_unseeded_request_is_not_retried(kind: str) -> None:
    h = Harness(kind, [httpx.Response(503), ok()])
    with pytest.raises(ServiceUnavailableError):
        h("rollouts", ["x"], seed=None)
    assert h.body()["sampling"]["seed"] is None
    assert len(h.requests) == 1 and h.sleeps == []


# -- errors by status -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ConflictError),
        (413, PayloadTooLargeError),
        (422, UnprocessableEntityError),
        (429, RateLimitError),
        (500, InternalServerError),
        (502, InternalServerError),
        (503, ServiceUnavailableError),
        (418, APIStatusError),
    ],
)
def test_exception_by_status(kind: str, status: int, cls: type[APIStatusError]) -> None:
    reply = httpx.Response(
        status,
        headers={C.REQUEST_ID_HEADER: "srv-1"},
        json=error_json(status, "some_type", "sampling.max_tokens"),
    )
    h = Harness(kind, [reply], max_retries=0)
    with pytest.raises(APIStatusError) as info:
        h("rollouts", ["x"])
    err = info.value
    assert type(err) is cls
    assert isinstance(err, dvp_client.APIError) and isinstance(err, dvp_client.DVPError)
    assert (err.status_code, err.type, err.param, err.request_id) == (
        status,
        "some_type",
        "sampling.max_tokens",
        "srv-1",
    )
    assert f"bad thing {status}" in str(err) and "sampling.max_tokens" in str(err)
    assert err.response.status_code == status and err.body == error_json(
        status, "some_type", "sampling.max_tokens"
    )


def test_error_bodies_that_are_not_ours(kind: str) -> None:
    fastapi_422 = httpx.Response(422, json={"detail": [{"loc": ["body", "n"], "msg": "bad n"}]})
    plain = httpx.Response(400, text="nope")
    h = Harness(kind, [fastapi_422, plain], max_retries=0)
    with pytest.raises(UnprocessableEntityError, match="bad n") as info:
        h("rollouts", ["x"])
    assert info.value.type is None and info.value.param is None
    # no request id in the response: the one the client sent
    assert info.value.request_id == h.requests[0].headers[C.REQUEST_ID_HEADER]
    with pytest.raises(BadRequestError, match="nope"):
        h("rollouts", ["x"])


def test_bad_success_body_is_a_validation_error(kind: str) -> None:
    h = Harness(kind, [httpx.Response(200, json={"rollouts": "?"}), httpx.Response(200, text="<")])
    with pytest.raises(APIResponseValidationError, match="RolloutBatch") as info:
        h("rollouts", ["x"])
    assert isinstance(info.value.__cause__, pydantic.ValidationError)
    with pytest.raises(APIResponseValidationError, match="not JSON"):
        h("rollouts", ["x"])


# -- timeouts, headers, URLs ----------------------------------------------------------


def test_timeouts_are_passed_through(kind: str) -> None:
    h = Harness(kind, ok)
    h("rollouts", ["x"])
    assert h.requests[-1].extensions["timeout"] == {
        "connect": 5.0,
        "read": 600.0,
        "write": 600.0,
        "pool": 600.0,
    }
    h("rollouts", ["x"], timeout=3.5)
    assert set(h.requests[-1].extensions["timeout"].values()) == {3.5}
    h("rollouts", ["x"], timeout=None)  # None: no timeout, not the default
    assert set(h.requests[-1].extensions["timeout"].values()) == {None}
    h("rollouts", ["x"], timeout=NOT_GIVEN)
    assert h.requests[-1].extensions["timeout"]["read"] == 600.0
    h("request", "GET", "/health", timeout=httpx.Timeout(7.0, connect=1.0))
    assert h.requests[-1].extensions["timeout"]["connect"] == 1.0


def test_client_timeout_and_http_client_timeout(kind: str) -> None:
    h = Harness(kind, ok, timeout=12.0)
    h("request", "GET", "/v1/models")
    assert set(h.requests[-1].extensions["timeout"].values()) == {12.0}
    client: Client | AsyncClient
    if kind == "sync":
        client = Client(BASE, http_client=httpx.Client(timeout=42.0))
    else:
        client = AsyncClient(BASE, http_client=httpx.AsyncClient(timeout=42.0))
    assert client.timeout == httpx.Timeout(42.0)  # an http_client's own timeout is kept


def test_auth_header(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(kind, ok)
    h("rollouts", ["x"])
    assert "authorization" not in h.requests[-1].headers
    h = Harness(kind, ok, api_key="sk-1")
    h("rollouts", ["x"])
    assert h.requests[-1].headers["authorization"] == "Bearer sk-1"
    monkeypatch.setenv(C.API_KEY_ENV, "from-env")
    h = Harness(kind, ok)
    h("request", "GET", "/v1/models")
    assert h.requests[-1].headers["authorization"] == "Bearer from-env"


def test_standard_and_extra_headers(kind: str) -> None:
    h = Harness(kind, ok)
    h("rollouts", ["x"])
    headers = h.requests[-1].headers
    assert headers["user-agent"].startswith("dvp-client/")
    assert headers["accept"] == "application/json"
    first_id = headers[C.REQUEST_ID_HEADER]
    assert len(first_id) == 32
    h("rollouts", ["x"], extra_headers={C.REQUEST_ID_HEADER: "mine", "X-Trace": "t"})
    assert h.requests[-1].headers[C.REQUEST_ID_HEADER] == "mine"
    assert h.requests[-1].headers["x-trace"] == "t"
    h("rollouts", ["x"])
    assert h.requests[-1].headers[C.REQUEST_ID_HEADER] not in (first_id, "mine")


def test_base_url_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    assert str(Client("http://h:1/").base_url) == "http://h:1"
    assert Client(base_url="http://h:1/prefix/")._url("/v1/models") == "http://h:1/prefix/v1/models"
    assert str(Client().base_url) == C.DEFAULT_BASE_URL
    monkeypatch.setenv(C.BASE_URL_ENV, "http://env:2")
    assert str(Client().base_url) == "http://env:2"
    with pytest.raises(ValueError, match="absolute"):
        Client("localhost:8000/v1")


# -- other routes -----------------------------------------------------------------------


def test_health_models_and_request(kind: str) -> None:
    card = {
        "id": "smollm2",
        "engine": "torch",
        "dtype": "float32",
        "vocab_size": 49152,
        "max_model_len": 8192,
        "policy_version": 0,
        "capabilities": {"fields": ["token_ids"], "exact_at_any_temperature": ["token_ids"]},
    }

    def server(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/health":
            return httpx.Response(
                200,
                json={"status": "ok", "engine": "torch", "engine_state": "r", "policy_version": 0},
            )
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [card]})
        return httpx.Response(204)

    h = Harness(kind, server)
    assert h("health").status == "ok"
    assert h("models").data[0].vocab_size == 49152
    assert h("request", "get", "/v1/models")["data"][0]["id"] == "smollm2"
    assert h("request", "POST", "/v1/weights", {"path": "w"}) is None
    assert (h.requests[-1].method, h.body()) == ("POST", {"path": "w"})


def test_escape_hatch_retries_only_what_is_safe(kind: str) -> None:
    h = Harness(kind, [httpx.Response(503), ok()])
    h("request", "GET", "/v1/weights")
    assert len(h.requests) == 2
    h = Harness(kind, [httpx.Response(503), ok()])
    with pytest.raises(ServiceUnavailableError):
        h("request", "POST", "/v1/weights", {"path": "w"})
    assert len(h.requests) == 1
    h = Harness(kind, [httpx.Response(503), ok()])
    h("request", "POST", "/v1/score", {}, safe_to_retry=True)
    assert len(h.requests) == 2


# -- lifecycle and the sentinel --------------------------------------------------------


def test_context_manager_closes_only_its_own_http_client(kind: str) -> None:
    if kind == "sync":
        with Client(BASE) as c:
            inner = c._client
        assert inner.is_closed
        mine = httpx.Client()
        with Client(BASE, http_client=mine):
            pass
        assert not mine.is_closed
        mine.close()
    else:

        async def run() -> None:
            async with AsyncClient(BASE) as c:
                inner = c._client
            assert inner.is_closed
            mine = httpx.AsyncClient()
            async with AsyncClient(BASE, http_client=mine):
                pass
            assert not mine.is_closed
            await mine.aclose()

        asyncio.run(run())


def test_not_given_sentinel() -> None:
    assert NotGiven() is NOT_GIVEN and not NOT_GIVEN and repr(NOT_GIVEN) == "NOT_GIVEN"
    assert NOT_GIVEN is not None
    import copy
    import pickle

    assert copy.deepcopy(NOT_GIVEN) is NOT_GIVEN
    assert pickle.loads(pickle.dumps(NOT_GIVEN)) is NOT_GIVEN


def test_health_answers_503_while_starting(kind: str) -> None:
    starting: dict[str, object] = {"status": "starting", "engine": "torch"}
    starting |= {"engine_state": "starting", "policy_version": 0}
    h = Harness(kind, [httpx.Response(503, json=starting), httpx.Response(503, text="proxy")])
    health = h("health")
    assert health.status == "starting" and len(h.requests) == 1 and h.sleeps == []
    with pytest.raises(ServiceUnavailableError, match="proxy"):
        h("health")
