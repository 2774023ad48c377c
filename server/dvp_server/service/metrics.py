"""``GET /metrics``: Prometheus text exposition of the service and of DVP itself.

One registry per app (tests run several apps in one process). Metrics:

=====================================  =========  ===================================
name                                   type       what
=====================================  =========  ===================================
dvp_http_requests_total                counter    requests by route, method, status
dvp_http_request_duration_seconds      histogram  request latency by route (whole body)
dvp_rollouts_total                     counter    rollouts ended, by finish_reason
                                                  (stop, length, abort, error, cancelled)
dvp_rollout_duration_seconds           histogram  admission -> last chunk
dvp_rollout_first_chunk_seconds        histogram  admission -> first chunk (queueing)
dvp_tokens_total                       counter    tokens by kind (prompt, completion)
dvp_batch_size                         histogram  rollouts per engine step (torch engine)
dvp_admission_rejected_total           counter    rollouts refused with 429
dvp_engine_restarts_total              counter    restart attempts after the engine died,
                                                  by outcome (ok, failed; supervisor.py)
dvp_rollouts_admitted / _running       gauge      slots taken / rollouts in the engine
dvp_queue_depth                        gauge      admitted rollouts not yet decoding
dvp_queue_capacity                     gauge      max_batch + max_queue
dvp_policy_version                     gauge      the served weights' version
dvp_admission_gate_open                gauge      0 while a weight update holds new rollouts
dvp_safe_set_size                      histogram  |S_t| per generated token
dvp_pruned_mass                        histogram  1 - Z_S per token (NaN steps skipped)
=====================================  =========  ===================================

The two DVP histograms are fed a chunk at a time with numpy
(:class:`ArrayHistogram`), not one ``observe`` call per token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from ..engines.base import Engine, RolloutChunk
from .admission import Admission, Ticket

__all__ = ["ArrayHistogram", "Metrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SAFE_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384, 65536, 262144)
PRUNED_MASS_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0)


class ArrayHistogram:
    """A Prometheus histogram fed whole arrays at once (thread-safe).

    ``counts[i]`` holds the values in ``(bounds[i-1], bounds[i]]`` (the last slot
    is ``+Inf``); exported cumulative, as Prometheus wants.

    Args:
        name: metric name (without ``_bucket`` / ``_sum`` / ``_count``).
        documentation: the HELP line.
        bounds: increasing upper bounds.
    """

    def __init__(self, name: str, documentation: str, bounds: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: np.ndarray) -> None:
        """Add every finite value of ``values`` (any shape; NaN / inf are skipped)."""
        v = np.asarray(values, dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        if v.size == 0:
            return
        slots = np.searchsorted(self.bounds, v, side="left")  # first bound >= v
        add = np.bincount(slots, minlength=len(self.counts))
        with self._lock:
            self.counts += add
            self.sum += float(v.sum())

    def collect(self) -> HistogramMetricFamily:
        with self._lock:
            cumulative = np.cumsum(self.counts).tolist()
            total = self.sum
        labels = [f"{b:g}" for b in self.bounds] + ["+Inf"]
        return HistogramMetricFamily(
            self.name,
            self.documentation,
            buckets=list(zip(labels, cumulative, strict=True)),
            sum_value=total,
        )


class Metrics:
    """Every metric of one app, and the hooks that feed them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "dvp_http_requests", "HTTP requests.", ["route", "method", "status"], registry=r
        )
        self.http_latency = Histogram(
            "dvp_http_request_duration_seconds",
            "HTTP request latency, until the last body byte.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rollouts = Counter("dvp_rollouts", "Rollouts ended.", ["finish_reason"], registry=r)
        self.rollout_latency = Histogram(
            "dvp_rollout_duration_seconds",
            "Rollout admission to last chunk.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_chunk = Histogram(
            "dvp_rollout_first_chunk_seconds",
            "Rollout admission to first chunk (queueing included).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("dvp_tokens", "Tokens.", ["kind"], registry=r)
        self.batch_size = Histogram(
            "dvp_batch_size", "Rollouts per engine step.", buckets=BATCH_BUCKETS, registry=r
        )
        self.rejected = Counter(
            "dvp_admission_rejected", "Rollouts refused with 429 (queue full).", registry=r
        )
        self.engine_restarts = Counter(
            "dvp_engine_restarts",
            "Engine restart attempts after the engine died, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.safe_size = ArrayHistogram(
            "dvp_safe_set_size", "Safe-set size |S_t| per generated token.", SAFE_SIZE_BUCKETS
        )
        self.pruned_mass = ArrayHistogram(
            "dvp_pruned_mass", "Pruned probability mass 1 - Z_S per generated token.",
            PRUNED_MASS_BUCKETS,
        )  # fmt: skip
        self._engine: Engine | None = None
        self._admission: Admission | None = None
        self._max_batch = 1
        r.register(_StateCollector(self))

    def bind(self, engine: Engine, admission: Admission, max_batch: int) -> None:
        """Feed from this engine and admission (called in the app lifespan)."""
        self._engine, self._admission, self._max_batch = engine, admission, max_batch
        admission.observer = self
        if hasattr(engine, "on_step"):
            engine.on_step = self.batch_size.observe  # type: ignore[attr-defined]

    # --- the admission observer ---------------------------------------------------------

    def on_chunk(self, ticket: Ticket, chunk: RolloutChunk) -> None:
        n = len(chunk.token_ids)
        if n:
            self.tokens.labels("completion").inc(n)
            self.safe_size.observe_many(chunk.safe_sizes)
            # 1 - Z_S = -expm1(log Z_S): exact for tiny pruned masses.
            self.pruned_mass.observe_many(-np.expm1(chunk.safe_logmass.astype(np.float64)))

    def on_end(self, ticket: Ticket) -> None:
        self.rollouts.labels(ticket.finish_reason or "cancelled").inc()
        if ticket.entered_at is not None:
            self.tokens.labels("prompt").inc(ticket.prompt_tokens)
        now = time.perf_counter()
        if ticket.finish_reason is not None:
            self.rollout_latency.observe(now - ticket.reserved_at)
        if ticket.first_chunk_at is not None:
            self.first_chunk.observe(ticket.first_chunk_at - ticket.reserved_at)

    def on_engine_restart(self, outcome: str) -> None:
        """One restart attempt of a dead engine ended (``"ok"`` or ``"failed"``)."""
        self.engine_restarts.labels(outcome).inc()

    def on_rejected(self) -> None:
        self.rejected.inc()

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)


class _StateCollector:
    """Gauges read at scrape time, and the array histograms."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self) -> list[Metric]:
        return []  # not known before the engine is bound

    def collect(self) -> Iterator[Metric]:
        m = self.m
        yield m.safe_size.collect()
        yield m.pruned_mass.collect()
        adm, eng = m._admission, m._engine
        if adm is None or eng is None:
            return
        running = len(adm.running)
        queued = getattr(eng, "queued_rollouts", max(0, running - m._max_batch))
        for name, doc, value in (
            ("dvp_rollouts_admitted", "Rollouts holding an admission slot.", adm.reserved),
            ("dvp_rollouts_running", "Admitted rollouts inside the engine.", running),
            ("dvp_queue_depth", "Admitted rollouts not yet decoding.", adm.held + queued),
            ("dvp_queue_capacity", "Admission slots (max_batch + max_queue).", adm.capacity),
            ("dvp_policy_version", "Version of the served weights.", eng.policy_version),
            ("dvp_admission_gate_open", "0 while a weight update holds rollouts.", adm.gate_open),
        ):
            yield GaugeMetricFamily(name, doc, value=float(value))
