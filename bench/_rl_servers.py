"""The servers ``rl_workload.py`` compares: started in their own process groups, their
CPU time read per role, stopped whole."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

MIN_BATCHED_TOKENS = 2048  # as server/dvp_server/engines/vllm/_args.py
KV_CACHE_BYTES = 1 << 30
ROLES = ("api", "engine", "worker")  # a vLLM server's processes: HTTP front end, core, worker


def group_cpu(pgid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of the live processes of a process group, by role.

    Roles from the process name: ``VLLM::Worker`` -> worker, ``VLLM::EngineCore``
    -> engine, anything else (the HTTP server) -> api. Linux only (``/proc``).
    """
    out = dict.fromkeys(ROLES, 0.0)
    tick = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :]
        fields = rest.split()  # fields[2]: pgrp, [11]: utime, [12]: stime (proc(5) - 3)
        if int(fields[2]) != pgid:
            continue
        role = "worker" if "Worker" in comm else "engine" if "Engine" in comm else "api"
        out[role] += (int(fields[11]) + int(fields[12])) / tick
    return out


# --- servers ------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A server subprocess in its own process group."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""

    def start(self, timeout: float) -> float:
        """Start and wait until ``/health`` is 200; seconds it took.

        Raises:
            RuntimeError: it exited or did not get healthy in time (with its log tail).
        """
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.cmd, "--port", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # its own process group: killed whole in stop()
            )
        while time.perf_counter() - t0 < timeout and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{self.name} did not get healthy; log tail:\n{tail}")

    def stop(self) -> None:
        """SIGTERM to the whole process group, SIGKILL to what is left after 30 s."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        try:
            os.killpg(pgid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)  # raises once every member is gone
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None


#: ``python -c`` program: dvp-serve with ``torch.set_num_threads(N)`` in its API process.
OURS_WITH_THREADS = (
    "import sys, torch; torch.set_num_threads({}); sys.argv[0] = 'dvp-serve'; "
    "from dvp_server.cli import main; main()"
)


def engine_flags(args: argparse.Namespace, max_len: int) -> dict[str, str]:
    """The engine settings both servers get (our names -> values)."""
    return {
        "dtype": args.dtype,
        "max_model_len": str(max_len),
        "kv_cache_bytes": str(KV_CACHE_BYTES),
        "max_num_seqs": str(args.max_num_seqs),
        "max_logprobs": str(args.k),
        "max_num_batched_tokens": str(max(max_len, MIN_BATCHED_TOKENS)),
    }


def make_servers(
    args: argparse.Namespace, model_dir: Path, max_len: int, logs: Path
) -> dict[str, Server]:
    """Our server and ``vllm serve`` with the same engine settings."""
    f = engine_flags(args, max_len)
    env = dict(os.environ)
    if env.get("VLLM_CPU_KVCACHE_SPACE") == "":
        del env["VLLM_CPU_KVCACHE_SPACE"]
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0)))))
    py = sys.executable
    launcher = ["-m", "dvp_server"]
    threads = getattr(args, "ours_torch_threads", None)
    if threads:  # torch threads of our API process (vLLM's workers keep their own)
        launcher = ["-c", OURS_WITH_THREADS.format(threads)]
    ours = [
        py, *launcher, "--engine", "vllm", "--model", str(model_dir),
        "--dtype", f["dtype"], "--max-model-len", f["max_model_len"],
        "--kv-cache-bytes", f["kv_cache_bytes"], "--max-batch", f["max_num_seqs"],
        "--max-logprobs", f["max_logprobs"], "--log-level", "warning",
    ]  # fmt: skip
    vllm = [
        py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", "model", "--dtype", f["dtype"],
        "--max-model-len", f["max_model_len"], "--kv-cache-memory-bytes", f["kv_cache_bytes"],
        "--no-enable-chunked-prefill", "--max-num-batched-tokens", f["max_num_batched_tokens"],
        "--enforce-eager", "--max-num-seqs", f["max_num_seqs"],
        "--max-logprobs", f["max_logprobs"], "--logprobs-mode", "raw_logprobs",  # vLLM's default
        "--seed", "0", "--disable-log-stats", "--disable-uvicorn-access-log",
        "--uvicorn-log-level", "warning", "--host", "127.0.0.1",
    ]  # fmt: skip
    return {
        "ours": Server("ours", ours, env, logs / "ours.log"),
        "vllm": Server("vllm", vllm, env, logs / "vllm.log"),
    }
