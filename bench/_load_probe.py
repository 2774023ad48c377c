"""Probes for ``bench/load.py``: the server's ``/metrics`` while a load runs, machine CPU.

``Sampler`` polls the completion-token counter and the rollouts in the engine
every 0.25 s (steady-state throughput); ``busy_cpu_s`` reads the machine's busy
CPU time, so a bench can tell how much other jobs took while it ran.
"""

from __future__ import annotations

import json
import os
import ssl
import statistics
import threading
import time
from functools import cache

import httpx
from prometheus_client.parser import text_string_to_metric_families


@cache
def ssl_context() -> ssl.SSLContext:
    """One TLS context for every client of the bench.

    httpx builds a context per client by default and parses the CA bundle for it
    (~23 ms of CPU each, even for http:// URLs): 32 clients spent ~0.75 s of CPU
    at the start of every load run on the cores the engine runs on, and the single
    batch (one client) ~0.02 s. Sharing one keeps that out of the comparison.
    """
    return ssl.create_default_context()


def scrape(url: str, api_key: str | None, client: httpx.Client | None = None) -> dict[str, float]:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else None
    get = client.get if client is not None else httpx.get
    text = get(f"{url}/metrics", headers=headers, timeout=30).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + (json.dumps(s.labels, sort_keys=True) if s.labels else "")
            out[key] = s.value
    return out


TOKENS_KEY = 'dvp_tokens_total{"kind": "completion"}'
PROMPT_KEY = 'dvp_tokens_total{"kind": "prompt"}'


def busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy so far (``/proc/stat``; 0 where absent).

    Minus the server's and this process's CPU over the same interval, it is what
    other jobs took from the cores (the engine's OpenMP threads are bound to all of
    them, so any of it slows every step).
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


class Sampler:
    """Polls the server's ``/metrics`` every ``period`` s in a thread during the load.

    Each sample: (time, completion tokens so far, rollouts running in the engine).
    The token counter moves a chunk at a time (vLLM engine: every 16 tokens of a
    rollout), so a window's count is off by under a chunk per running rollout at
    each end, in both directions.
    """

    def __init__(self, url: str, api_key: str | None, period: float = 0.25) -> None:
        self.url, self.api_key, self.period = url, api_key, period
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        with httpx.Client(verify=ssl_context()) as client:  # one connection, one context
            while not self._stop.is_set():
                m = scrape(self.url, self.api_key, client)
                t = time.perf_counter()
                row = (t, m.get(TOKENS_KEY, 0.0), m.get("dvp_rollouts_running", 0.0))
                self.samples.append(row)
                self._stop.wait(self.period)

    def steady(self, full: float, until: float) -> dict[str, float | None]:
        """Throughput while the load keeps the engine full.

        The window runs from the first sample with at least ``full`` rollouts running
        (the clients' first requests are all in) to the last sample before ``until``
        (the first client has sent its last request: from then on the batch drains).

        Returns:
            ``steady_tokens_per_s``, ``steady_window_s``, ``steady_mean_running``
            (mean of the samples in the window), ``mean_running`` (all samples).
        """
        s = self.samples
        mean_all = statistics.mean(x[2] for x in s) if s else None
        i = next((k for k, x in enumerate(s) if x[2] >= full), None)
        j = max((k for k, x in enumerate(s) if x[0] <= until), default=None)
        if i is None or j is None or j <= i:
            return dict.fromkeys(
                ("steady_tokens_per_s", "steady_window_s", "steady_mean_running"), None
            ) | {"mean_running": mean_all}
        dt = s[j][0] - s[i][0]
        return {
            "steady_tokens_per_s": round((s[j][1] - s[i][1]) / dt, 1),
            "steady_window_s": round(dt, 2),
            "steady_mean_running": round(statistics.mean(x[2] for x in s[i : j + 1]), 1),
            "mean_running": round(mean_all, 1) if mean_all is not None else None,
        }
