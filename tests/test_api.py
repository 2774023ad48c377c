"""Bad input over HTTP gets a 4xx error envelope that names the field.

Against the real server (``server`` fixture: uvicorn subprocess, tiny model,
limits :data:`conftest.TINY_LIMITS`), with raw httpx so that the bytes on the
wire are exactly the ones under test (``NaN``, malformed JSON). The last
tests run the app in process with the real engine to reach the 503 (engine
failure) and 500 (unexpected exception) paths.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import TINY_LIMITS
from dvp_client import Client, UnprocessableEntityError
from dvp_server.api.app import create_app
from dvp_server.config import ServerConfig
from fastapi.testclient import TestClient

OK_BODY: dict[str, Any] = {"prompts": ["Hello"], "sampling": {"max_tokens": 2, "seed": 0}}
TOO_LONG = 600  # tokens; the tiny model's context is 512
CAP = TINY_LIMITS["max_tokens_cap"]


def _body(**over: Any) -> dict[str, Any]:
    return {**OK_BODY, **over}


# (id, request body: a dict sent as JSON or raw bytes, status, param, text in the message)
BAD_REQUESTS: list[tuple[str, Any, int, str | None, str]] = [
    ("unknown-top-level", _body(temprature=0.5), 422, "temprature", "unknown field"),
    ("unknown-nested", _body(sampling={"max_token": 3}), 422, "sampling.max_token", "unknown"),
    ("unknown-in-rule", _body(pruning={"minp": 0.1}), 422, "pruning.minp", "unknown field"),
    ("prompt-ids-too-long", _body(prompts=["hi", [1] * TOO_LONG]), 422, "prompts.1", "tokens"),
    ("prompt-text-too-long", _body(prompts=["hello " * TOO_LONG]), 422, "prompts.0", "limit"),
    (
        "max-tokens-over-cap",
        _body(sampling={"max_tokens": CAP + 1}),
        422,
        "sampling.max_tokens",
        str(CAP),
    ),
    ("token-id-too-large", _body(prompts=[[1, 2, 49152]]), 422, "prompts.0.2", "vocabulary"),
    ("token-id-negative", _body(prompts=["ok", [-1, 5]]), 422, "prompts.1.0", "vocabulary"),
    ("token-id-huge", _body(prompts=[[2**70]]), 422, "prompts.0.0", "vocabulary"),
    ("token-id-not-int", _body(prompts=[[1, "x"]]), 422, "prompts.0.1", "integer"),
    (
        "stop-id-outside-vocab",
        _body(sampling={"stop_token_ids": [10**6]}),
        422,
        "sampling.stop_token_ids.0",
        "vocabulary",
    ),
    (
        "nan-temperature",
        b'{"prompts": ["Hello"], "sampling": {"temperature": NaN}}',
        422,
        "sampling.temperature",
        "finite",
    ),
    (
        "infinite-top-p",
        b'{"prompts": ["a"], "pruning": {"top_p": Infinity}}',
        422,
        "pruning.top_p",
        "finite",
    ),
    (
        "negative-temperature",
        _body(sampling={"temperature": -1}),
        422,
        "sampling.temperature",
        "greater",
    ),
    ("negative-n", _body(n=-2), 422, "n", "greater than or equal to 1"),
    ("n-over-limit", _body(n=TINY_LIMITS["max_n"] + 1), 422, "n", "limit"),
    ("too-many-rollouts", _body(prompts=["a"] * 8, n=10), 422, "n", "80 rollouts"),
    ("top-p-zero", _body(pruning={"top_p": 0}), 422, "pruning.top_p", "greater than 0"),
    ("top-p-above-one", _body(pruning={"top_p": 1.5}), 422, "pruning.top_p", "less than"),
    ("min-p-above-one", _body(pruning={"min_p": 2}), 422, "pruning.min_p", "less than"),
    ("top-k-negative", _body(pruning={"top_k": -1}), 422, "pruning.top_k", "greater"),
    ("empty-prompts", _body(prompts=[]), 422, "prompts", "at least 1"),
    ("empty-text-prompt", _body(prompts=["ok", ""]), 422, "prompts.1", "empty"),
    ("empty-ids-prompt", _body(prompts=[[]]), 422, "prompts.0", "at least 1"),
    ("prompt-wrong-type", _body(prompts=[5]), 422, "prompts.0", "valid"),
    (
        "chat-bad-role",
        _body(prompts=[[{"role": "bot", "content": "x"}]]),
        422,
        "prompts.0.0.role",
        "user",
    ),
    (
        "chat-unknown-field",
        _body(prompts=[[{"role": "user", "content": "x", "name": "y"}]]),
        422,
        "prompts.0.0.name",
        "unknown",
    ),
    ("empty-stop-string", _body(sampling={"stop": [""]}), 422, "sampling.stop", "non-empty"),
    ("missing-prompts", {"n": 1}, 422, "prompts", "required"),
    ("body-not-an-object", b"[1, 2]", 422, None, "dictionary"),
    ("malformed-json", b'{"prompts": ["a"],', 422, None, "malformed JSON"),
    ("wrong-model", _body(model="gpt-17"), 404, "model", "gpt-17"),
]


def _post(base: str, body: Any, **kw: Any) -> httpx.Response:
    if isinstance(body, bytes):
        headers = {"content-type": "application/json", **kw.pop("headers", {})}
        return httpx.post(f"{base}/v1/rollouts", content=body, headers=headers, timeout=60, **kw)
    return httpx.post(f"{base}/v1/rollouts", json=body, timeout=60, **kw)


def _check_envelope(r: Any, status: int, param: str | None, text: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"type", "message", "param", "code"}
    assert error["code"] == status
    assert error["param"] == param, error
    assert text.lower() in error["message"].lower(), error
    if param is not None:
        assert param in error["message"], error


@pytest.mark.parametrize(
    ("body", "status", "param", "text"),
    [b[1:] for b in BAD_REQUESTS],
    ids=[b[0] for b in BAD_REQUESTS],
)
def test_bad_request_gets_an_envelope_naming_the_field(
    server: str, body: Any, status: int, param: str | None, text: str
) -> None:
    r = _post(server, body)
    _check_envelope(r, status, param, text)
    assert r.json()["error"]["type"] == (
        "not_found_error" if status == 404 else "invalid_request_error"
    )


def test_http_errors_use_the_envelope(server: str) -> None:
    r = httpx.get(f"{server}/v1/nothing-here")
    _check_envelope(r, 404, None, "not found")
    r = httpx.get(f"{server}/v1/rollouts")
    _check_envelope(r, 405, None, "method not allowed")


def test_request_body_over_the_limit_is_a_413(server: str) -> None:
    limit = TINY_LIMITS["max_request_bytes"]
    big = _body(prompts=[[1] * (limit // 2)])  # ~1 MB of "1, " pairs: over the limit
    r = _post(server, big)
    _check_envelope(r, 413, None, f"over the limit of {limit} bytes")
    assert r.json()["error"]["type"] == "request_too_large_error"

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        yield b'{"prompts": [['
        for _ in range(limit // 1000 + 1):
            yield b"1, " * 333 + b"1, "
        yield b"1]]}"

    r = httpx.post(
        f"{server}/v1/rollouts",
        content=chunked(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    _check_envelope(r, 413, None, "over the limit")
    assert _post(server, _body()).status_code == 200


def test_error_responses_echo_the_request_id(server: str) -> None:
    r = _post(server, _body(n=0), headers={"X-Request-Id": "bad-1"})
    assert r.status_code == 422 and r.headers["x-request-id"] == "bad-1"
    r = _post(
        server, b"{", headers={"X-Request-Id": "bad 2 \u00e9".encode("latin-1")}
    )  # not a valid id
    assert r.headers["x-request-id"].startswith("req-")


def test_client_raises_with_the_param(server: str) -> None:
    """The client (which validates arguments locally) still reports server-side 422s."""
    with (
        Client(server, max_retries=0, timeout=60) as c,
        pytest.raises(UnprocessableEntityError) as info,
    ):
        c.rollouts([[1, 49152]], max_tokens=2)
    assert info.value.status_code == 422
    assert "prompts.0.1" in str(info.value)


def test_server_still_serves_after_bad_requests(server: str) -> None:
    for _, body, *_ in BAD_REQUESTS:
        _post(server, body)
    r = _post(server, _body(prompts=["Hello", [1, 2]], n=2))
    assert r.status_code == 200, r.text
    assert len(r.json()["rollouts"]) == 4
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


# --- in process, real engine: the 5xx paths -------------------------------------------


@pytest.fixture(scope="module")
def app_client(tiny_model_dir: Path) -> Iterator[TestClient]:
    app = create_app(ServerConfig(model=str(tiny_model_dir), engine="torch", max_batch=4))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_engine_failure_is_a_retryable_503(app_client: TestClient) -> None:
    engine = app_client.app.state.engine  # type: ignore[attr-defined]

    def fail(request_ids: Any) -> None:
        raise RuntimeError("simulated kernel failure")

    engine.step_hook = fail
    try:
        r = app_client.post("/v1/rollouts", json=_body(n=3))
    finally:
        engine.step_hook = None
    _check_envelope(r, 503, None, "simulated kernel failure")
    assert r.json()["error"]["type"] == "engine_error"
    assert r.headers["retry-after"] == "1"
    ok = app_client.post("/v1/rollouts", json=_body(n=3))
    assert ok.status_code == 200 and len(ok.json()["rollouts"]) == 3


def test_unexpected_exception_is_a_logged_500(
    app_client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    service = app_client.app.state.service  # type: ignore[attr-defined]

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise ZeroDivisionError("secret internal detail")

    monkeypatch.setattr(service, "create_rollouts", broken)
    with caplog.at_level(logging.ERROR, logger="dvp_server.api.errors"):
        r = app_client.post("/v1/rollouts", json=_body(), headers={"X-Request-Id": "boom-1"})
    _check_envelope(r, 500, None, "internal server error")
    assert "secret" not in r.text  # details stay in the log
    assert r.headers["x-request-id"] == "boom-1"
    assert any(rec.exc_info and "secret" in str(rec.exc_info[1]) for rec in caplog.records)
    monkeypatch.undo()
    assert app_client.post("/v1/rollouts", json=_body()).status_code == 200


def test_openapi_declares_the_error_envelope(app_client: TestClient) -> None:
    spec = app_client.get("/openapi.json").json()
    responses = spec["paths"]["/v1/rollouts"]["post"]["responses"]
    assert {"200", "404", "422", "503"} <= set(responses)
    ref = responses["422"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/ErrorResponse")
    assert "curl" in spec["paths"]["/v1/rollouts"]["post"]["description"]


def test_dead_engine_gives_503s(tiny_model_dir: Path) -> None:
    """After the engine stops, /health says so and rollouts are refused with a 503."""
    app = create_app(ServerConfig(model=str(tiny_model_dir), engine="torch", max_batch=2))
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/health").json()["status"] == "ok"
        c.portal.call(app.state.engine.shutdown)  # type: ignore[union-attr]
        health = c.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "dead" and health.json()["engine_state"] == "dead"
        r = c.post("/v1/rollouts", json=_body())
        _check_envelope(r, 503, None, "dead")


def test_cli_help_explains_every_option() -> None:
    from dvp_server.cli import app as cli
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli, ["--help"], prog_name="dvp-serve", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in (
        "--host",
        "--port",
        "--model",
        "--dtype",
        "--max-batch",
        "--max-tokens-cap",
        "--max-n",
        "--cache-dir",
        "--log-level",
    ):
        line = next(x for x in result.output.splitlines() if f"{option} " in x)
        assert len(line.split(option, 1)[1].strip()) > 10, f"{option} has no help text"


@pytest.mark.parametrize(
    ("args", "field"),
    [(["--dtype", "int8"], "dtype"), (["--max-n", "0"], "max_n"), (["--port", "-5"], "port")],
)
def test_cli_rejects_bad_settings_naming_them(args: list[str], field: str) -> None:
    from dvp_server.cli import app as cli
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli, args, env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert field in result.output
