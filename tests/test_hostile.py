"""Hostile requests against a real server (torch engine, tiny model): every one is a 4xx
in the error envelope, nothing is a 5xx, and the server stays healthy and serving.

- the battery: malformed requests on every route with a body (lone surrogates in
  every text field, bad values, bodies that do not decode: nesting, encoding,
  msgpack stack), each with the status and ``param`` it must answer;
- bodies over ``--max-request-bytes`` sent chunked (no Content-Length), JSON and
  msgpack, and with a Content-Length: 413 in the envelope, not a reset;
- the event loop stays free: ``/health`` answers within 1 s while a server with
  ``--max-request-bytes 16 MiB`` processes a body of about that size (a text prompt,
  token ids in JSON and msgpack) and while long prompts are tokenized.

The surrogate checks live in the wire schemas and text reaches an engine only
after validation, so the path is engine-independent; the last test runs the text
cases against the vLLM engine (slow, vllm).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from _ops import own_server
from conftest import TINY_LIMITS

JSON = "application/json"
MSGPACK = "application/msgpack"
SURROGATE = '"\\ud800"'  # valid JSON, not valid Unicode text
BIG_LIMIT = 16 << 20  # --max-request-bytes of the latency server
HEALTH_BOUND_S = 1.0  # liveness, generous: the loop is never held for long
MSG = '{"role": "user", "content": "hi"}'


def _j(template: str) -> bytes:
    """A JSON body: ``@`` is a JSON string holding a lone surrogate, ``$M`` a chat message."""
    return template.replace("$M", MSG).replace("@", SURROGATE).encode()


# (route, body, content type, status, param); param None: the body as a whole
BATTERY: list[tuple[str, bytes, str, int, str | None]] = [
    ("/v1/rollouts", _j('{"prompts": [@]}'), JSON, 422, "prompts.0"),
    ("/v1/rollouts", b'{"prompts": ["ok", "a\\ud800b"]}', JSON, 422, "prompts.1"),
    ("/v1/rollouts", _j('{"prompts": [[$M, {"role": "user", "content": @}]]}'), JSON, 422,
     "prompts.0.1.content"),
    ("/v1/rollouts", _j('{"prompts": ["a"], "sampling": {"stop": ["x", @]}}'), JSON, 422,
     "sampling.stop.1"),
    ("/v1/rollouts", _j('{"prompts": ["a"], "sampling": {"stop": @}}'), JSON, 422,
     "sampling.stop.0"),
    ("/v1/rollouts", _j('{"prompts": [@], "stream": true}'), JSON, 422, "prompts.0"),
    ("/v1/rollouts", msgpack.packb({"prompts": ["\ud800"]}, unicode_errors="surrogatepass"),
     MSGPACK, 422, None),  # msgpack strings are UTF-8: a surrogate is malformed there
    ("/v1/rollouts", _j('{"prompts": ["a"], "model": @}'), JSON, 404, "model"),
    ("/v1/rollouts", b'{"prompts": []}', JSON, 422, "prompts"),
    ("/v1/rollouts", b'{"prompts": [""]}', JSON, 422, "prompts.0"),
    ("/v1/rollouts", b'{"prompts": ["a"], "n": 0}', JSON, 422, "n"),
    ("/v1/rollouts", b'{"prompts": ["a"], "n": "two"}', JSON, 422, "n"),
    ("/v1/rollouts", b'{"prompts": ["a"], "sampling": {"temperature": -1}}', JSON, 422,
     "sampling.temperature"),
    ("/v1/rollouts", b'{"prompts": ["a"], "sampling": {"max_tokens": 100000}}', JSON, 422,
     "sampling.max_tokens"),
    ("/v1/rollouts", b'{"prompts": [[1, 99999999]]}', JSON, 422, "prompts.0.1"),
    ("/v1/rollouts", b'{"prompts": ["a"], "pruning": {"min_p": 2}}', JSON, 422, "pruning.min_p"),
    ("/v1/rollouts", b'{"prompts": ["a"], "bogus": 1}', JSON, 422, "bogus"),
    ("/v1/rollouts", ('{"prompts": ["%s"]}' % ("word " * 20_000)).encode(), JSON, 422, "prompts.0"),
    ("/v1/rollouts", json.dumps({"prompts": [[1] * 100_000]}).encode(), JSON, 413, None),
    ("/v1/rollouts", msgpack.packb({"prompts": [[1] * 300_000]}), MSGPACK, 413, None),
    ("/v1/rollouts", b"[" * 100_000 + b"]" * 100_000, JSON, 422, None),
    ("/v1/rollouts", b"[" * 300_000 + b"]" * 300_000, JSON, 422, None),  # decoded in a thread
    ("/v1/rollouts", b"\x91" * 100_000 + b"\x90", MSGPACK, 422, None),
    ("/v1/rollouts", msgpack.packb(json.loads("[" * 900 + "]" * 900)), MSGPACK, 422, None),
    ("/v1/rollouts", b'{"prompts": ["\xff\xfe"]}', JSON, 422, None),
    ("/v1/rollouts", b'{"prompts": ["a"]', JSON, 422, None),
    ("/v1/rollouts", b"[1, 2]", JSON, 422, None),
    ("/v1/rollouts", b"", JSON, 422, None),
    ("/v1/completions", _j('{"prompt": @}'), JSON, 422, "prompt"),
    ("/v1/completions", _j('{"prompt": ["a", @]}'), JSON, 422, "prompt.1"),
    ("/v1/completions", _j('{"prompt": "a", "stop": ["x", @]}'), JSON, 422, "stop.1"),
    ("/v1/completions", b'{"prompt": "a", "best_of": 3}', JSON, 422, "best_of"),
    ("/v1/completions", b'{"prompt": "a", "max_tokens": 100000}', JSON, 422, "max_tokens"),
    ("/v1/completions", b'{"prompt": "a", "logprobs": 99}', JSON, 422, "logprobs"),
    ("/v1/completions", b'{"prompt": "a", "echo": true}', JSON, 422, "echo"),
    ("/v1/completions", b'{"prompt": [[1], [1, 99999999]]}', JSON, 422, "prompt.1.1"),
    ("/v1/chat/completions", _j('{"messages": [{"role": "user", "content": @}]}'), JSON, 422,
     "messages.0.content"),
    ("/v1/chat/completions",
     _j('{"messages": [$M, {"role": "user", "content": [{"type": "text", "text": @}]}]}'),
     JSON, 422, "messages.1.content"),
    ("/v1/chat/completions", _j('{"messages": [$M], "stop": @}'), JSON, 422, "stop"),
    ("/v1/chat/completions", _j('{"messages": [$M], "top_logprobs": 2}'), JSON, 422,
     "top_logprobs"),
    ("/v1/chat/completions", _j('{"messages": [$M], "max_completion_tokens": 100000}'), JSON, 422,
     "max_completion_tokens"),
    ("/v1/chat/completions", _j('{"messages": [$M], "tools": [{}]}'), JSON, 422,
     "tools"),
    ("/v1/chat/completions", b'{"messages": []}', JSON, 422, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "x"}]}', JSON, 422,
     "messages.0.role"),
    ("/v1/score", b'{"sequences": []}', JSON, 422, "sequences"),
    ("/v1/score", b'{"sequences": [{"prompt_token_ids": [99999999], "completion_token_ids": '
     b"[1]}]}", JSON, 422, "sequences.0.prompt_token_ids.0"),
    ("/v1/score", b'{"sequences": [{"prompt_token_ids": [1], "completion_token_ids": [1]}], '
     b'"temperature": -1}', JSON, 422, "temperature"),
    ("/v1/score", _j('{"sequences": [{"prompt_token_ids": [1], "completion_token_ids": [1]}], '
     '"model": @}'), JSON, 404, "model"),
    ("/v1/score", b"[" * 100_000 + b"]" * 100_000, JSON, 422, None),
    ("/v1/weights", _j('{"path": @}'), JSON, 422, "path"),
    ("/v1/weights", b'{"path": 1}', JSON, 422, "path"),
    ("/v1/weights", b'{"path": "x", "bogus": 1}', JSON, 422, "bogus"),
    ("/v1/weights", b"[" * 100_000 + b"]" * 100_000, JSON, 422, None),
    ("/v1/weights/upload", b"not a safetensors file", "application/octet-stream", 422, "body"),
]  # fmt: skip


def _check_envelope(r: httpx.Response, status: int, param: str | None) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"type", "message", "param", "code"}
    assert error["code"] == status and error["message"]
    assert error["param"] == param, error


@pytest.mark.parametrize(
    ("route", "body", "content_type", "status", "param"),
    BATTERY,
    ids=[f"{i}-{case[0].rsplit('/', 1)[-1]}" for i, case in enumerate(BATTERY)],
)
def test_hostile_request_gets_a_4xx_envelope(
    server: str, route: str, body: bytes, content_type: str, status: int, param: str | None
) -> None:
    r = httpx.post(server + route, content=body, headers={"content-type": content_type}, timeout=60)
    _check_envelope(r, status, param)


def _chunked(total: int, head: bytes = b'{"prompts": ["') -> Iterator[bytes]:
    """A body of ``total`` bytes sent without a Content-Length (a generator body)."""
    yield head
    block = b"a" * (256 << 10)
    for _ in range(total // len(block)):
        yield block
    yield b'"]}'


@pytest.mark.parametrize("content_type", [JSON, MSGPACK])
def test_bodies_over_the_limit_get_413_chunked_or_not(server: str, content_type: str) -> None:
    limit = TINY_LIMITS["max_request_bytes"]
    headers = {"content-type": content_type}
    chunked = httpx.post(
        f"{server}/v1/rollouts", content=_chunked(3 * limit), headers=headers, timeout=60
    )
    _check_envelope(chunked, 413, None)
    assert f"limit of {limit} bytes" in chunked.json()["error"]["message"]
    sized = httpx.post(
        f"{server}/v1/rollouts", content=b"a" * (3 * limit), headers=headers, timeout=60
    )
    _check_envelope(sized, 413, None)


def test_server_healthy_and_serving_after_the_battery(server: str) -> None:
    for route, body, content_type, _, _ in BATTERY[:8]:  # again, in case this runs alone
        httpx.post(server + route, content=body, headers={"content-type": content_type})
    assert httpx.get(f"{server}/health", timeout=10).json()["status"] == "ok"
    valid = {"prompts": ["a \U0001f600 é", [{"role": "user", "content": "hi \u2028"}]],
             "sampling": {"max_tokens": 2, "stop": ["\U0001f600"]}}  # fmt: skip
    r = httpx.post(f"{server}/v1/rollouts", json=valid, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["rollouts"]) == 2


# --- the event loop stays free ---------------------------------------------------------


@pytest.fixture(scope="module")
def big_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A tiny-model server that takes bodies up to 16 MiB (prompts up to 511 tokens)."""
    log_dir = tmp_path_factory.mktemp("hostile-server")
    args = ["--max-request-bytes", str(BIG_LIMIT), "--max-batch", "16", "--max-rollouts", "512"]
    with own_server(tiny_model_dir, log_dir, *args) as server:
        yield server.base_url


def _post_while_polling_health(
    base: str, body: bytes, content_type: str
) -> tuple[httpx.Response, list[float]]:
    """POST ``body`` to /v1/rollouts while another thread polls /health; its latencies."""
    latencies: list[float] = []
    failures: list[BaseException] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=30) as client:
            while not done.is_set():
                t0 = time.perf_counter()
                try:
                    assert client.get(f"{base}/health").status_code == 200
                except BaseException as exc:  # reported by the test thread
                    failures.append(exc)
                    return
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        headers = {"content-type": content_type}
        r = httpx.post(f"{base}/v1/rollouts", content=body, headers=headers, timeout=300)
    finally:
        time.sleep(0.1)
        done.set()
        poller.join()
    assert not failures, failures
    assert len(latencies) >= 3
    return r, latencies


def _ids_body(n_bytes: int) -> dict[str, Any]:
    return {"prompts": [[1] * (n_bytes // 2 - 20)]}  # "1," per id


LARGE_BODIES = {
    # a text prompt of ~16 MB: refused by the length bound, not tokenized (was 15 s+)
    "text": (json.dumps({"prompts": ["hello world " * (BIG_LIMIT // 13)]}).encode(), JSON, 422),
    # ~8M token ids: json.loads + validation held the loop for seconds; now 413 at the cap
    "ids-json": (json.dumps(_ids_body(BIG_LIMIT), separators=(",", ":")).encode(), JSON, 413),
    "ids-msgpack": (msgpack.packb(_ids_body(BIG_LIMIT)), MSGPACK, 413),
    # 511 prompts that fit (~2 KB each) and a last one too long: all tokenized, then 422
    "tokenized": (
        json.dumps({"prompts": ["hello world " * 170] * 511 + ["hello world " * 600]}).encode(),
        JSON,
        422,
    ),
}


@pytest.mark.parametrize("case", list(LARGE_BODIES))
def test_health_answers_while_a_large_body_is_processed(big_server: str, case: str) -> None:
    body, content_type, status = LARGE_BODIES[case]
    assert len(body) <= BIG_LIMIT
    r, latencies = _post_while_polling_health(big_server, body, content_type)
    assert r.status_code == status, r.text[:300]
    if case in ("text", "tokenized"):
        assert r.json()["error"]["param"] in ("prompts.0", "prompts.511")
    assert max(latencies) < HEALTH_BOUND_S, (case, sorted(latencies)[-5:])


# --- the vLLM engine ---------------------------------------------------------------------

VLLM_CASES = [case for case in BATTERY if SURROGATE.encode() in case[1] or b"ud800" in case[1]]


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_engine_refuses_the_same_text_and_keeps_serving(vllm_server: Any) -> None:
    base = vllm_server.base_url
    for route, body, content_type, status, param in VLLM_CASES:
        if route.startswith("/v1/weights") or route == "/v1/score":
            continue  # weight loading and scoring have their own vLLM tests
        headers = {"content-type": content_type}
        _check_envelope(httpx.post(base + route, content=body, headers=headers, timeout=120),
                        status, param)  # fmt: skip
    assert httpx.get(f"{base}/health", timeout=10).json()["status"] == "ok"
    valid = {"prompts": ["a \U0001f600 é"], "sampling": {"max_tokens": 2, "stop": ["\U0001f600"]}}
    r = httpx.post(f"{base}/v1/rollouts", json=valid, timeout=120)
    assert r.status_code == 200, r.text
