"""Helpers for the ops tests: short-lived servers with special flags, metric reads."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from conftest import STARTUP_TIMEOUT_S, ServerProcess, start_server, stop_server
from prometheus_client.parser import text_string_to_metric_families


@contextmanager
def own_server(model_dir: Path, log_dir: Path, *args: str) -> Iterator[ServerProcess]:
    """A torch-engine server over ``model_dir`` with extra CLI ``args``, stopped at exit.

    One torch thread: on a machine shared with other jobs the tiny model decodes
    8-25x faster with 1 thread than with 2 (``ServerConfig.threads``).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    server = start_server(
        str(model_dir),
        log_dir / "server.log",
        ["--engine", "torch", "--threads", "1", "--log-level", "info", *args],
        STARTUP_TIMEOUT_S,
    )
    try:
        yield server
    finally:
        stop_server(server)


def metrics(base: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """Every sample of ``GET /metrics`` as ``{'name{k="v",...}': value}`` (labels sorted)."""
    r = httpx.get(f"{base}/metrics", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out
