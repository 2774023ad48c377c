"""What the objective benchmarks share (``objective.py``, ``_head.py``): the rule's
settings and the two measurements, timing in rounds and the extra peak memory."""

from __future__ import annotations

import time
from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile

__all__ = ["MIN_P", "TEMPERATURE", "extra_peak_bytes", "time_rounds"]

TEMPERATURE = 0.9
MIN_P = 1e-3  # the DVP threshold rho


def time_rounds(runs: list[Callable[[], object]], repeat: int) -> list[list[float]]:
    """Seconds per forward+backward: ``repeat`` rounds, each running every method once.

    Round-robin, so that load from other processes on a shared machine falls on
    every method alike; one warm-up round first.
    """
    times: list[list[float]] = [[] for _ in runs]
    for r in range(repeat + 1):
        for i, run_once in enumerate(runs):
            t0 = time.perf_counter()
            run_once()
            if r > 0:
                times[i].append(time.perf_counter() - t0)
    return times


def extra_peak_bytes(run_once: Callable[[], object]) -> int:
    """Peak of (allocated - freed) bytes during one forward+backward (profiler events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_once()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak
