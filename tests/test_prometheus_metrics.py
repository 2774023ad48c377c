"""``GET /metrics``: counts against what the responses themselves say, over HTTP.

(``tests/test_metrics.py`` is the trainer-side mismatch metrics.)
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from _ops import metrics
from dvp_server.service.metrics import PRUNED_MASS_BUCKETS, SAFE_SIZE_BUCKETS, ArrayHistogram
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families


def _delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def _buckets(m: dict[str, float], name: str, bounds: tuple[float, ...]) -> np.ndarray:
    return np.array([m.get(f'{name}_bucket{{le="{b:g}"}}', 0.0) for b in bounds])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_array_histogram_matches_prometheus_histogram(seed: int) -> None:
    """Bucket counts and sum equal prometheus_client's own Histogram fed one by one."""
    rng = np.random.default_rng(seed)
    values = np.concatenate(
        [rng.exponential(0.01, 500), np.array(PRUNED_MASS_BUCKETS), [0.0, np.nan, np.inf]]
    )
    ours = ArrayHistogram("x", "x", PRUNED_MASS_BUCKETS)
    for part in np.array_split(values, 7):
        ours.observe_many(part)
    reg = CollectorRegistry()
    ref = Histogram("x", "x", buckets=PRUNED_MASS_BUCKETS, registry=reg)
    for v in values[np.isfinite(values)]:
        ref.observe(float(v))
    got = {s.labels["le"]: s.value for s in ours.collect().samples if s.name == "x_bucket"}
    want = {
        s.labels["le"]: s.value
        for f in text_string_to_metric_families(generate_latest(reg).decode())
        for s in f.samples
        if s.name == "x_bucket"
    }
    assert {float(k): v for k, v in got.items()} == {float(k): v for k, v in want.items()}
    total = next(s.value for s in ours.collect().samples if s.name == "x_sum")
    assert total == pytest.approx(float(np.nansum(values[np.isfinite(values)])), rel=1e-12)


def test_metrics_count_what_the_responses_carry(server: str) -> None:
    before = metrics(server)
    body = {
        "prompts": ["count me", [5, 6, 7]],
        "n": 3,
        "sampling": {"max_tokens": 12, "seed": 3, "temperature": 1.0},
        "pruning": {"min_p": 0.02},
    }
    r = httpx.post(f"{server}/v1/rollouts", json=body, timeout=300)
    assert r.status_code == 200, r.text
    assert httpx.post(f"{server}/v1/rollouts", json={"n": 1}, timeout=60).status_code == 422
    assert httpx.get(f"{server}/no/such/page", timeout=60).status_code == 404
    after = metrics(server)
    rollouts = r.json()["rollouts"]
    sizes = np.concatenate([ro["safe_sizes"] for ro in rollouts]).astype(np.float64)
    logmass = np.concatenate([ro["safe_logmass"] for ro in rollouts]).astype(np.float64)
    n_tokens = len(sizes)

    req = 'dvp_http_requests_total{method="POST",route="/v1/rollouts",status="%d"}'
    assert _delta(after, before, req % 200) == 1 and _delta(after, before, req % 422) == 1
    not_found = 'dvp_http_requests_total{method="GET",route="unmatched",status="404"}'
    assert _delta(after, before, not_found) == 1  # raw paths never become labels
    assert _delta(after, before, 'dvp_tokens_total{kind="completion"}') == n_tokens
    prompt_tokens = sum(len(ro["prompt_token_ids"]) for ro in rollouts)
    assert _delta(after, before, 'dvp_tokens_total{kind="prompt"}') == prompt_tokens
    reasons: dict[str, int] = {}
    for ro in rollouts:
        reasons[ro["finish_reason"]] = reasons.get(ro["finish_reason"], 0) + 1
    for reason, count in reasons.items():
        assert _delta(after, before, f'dvp_rollouts_total{{finish_reason="{reason}"}}') == count
    assert _delta(after, before, "dvp_rollout_duration_seconds_count") == 6
    assert _delta(after, before, "dvp_batch_size_count") >= 12  # one per engine step

    # DVP histograms, bucket by bucket, from the response's own columns.
    got = _buckets(after, "dvp_safe_set_size", SAFE_SIZE_BUCKETS) - _buckets(
        before, "dvp_safe_set_size", SAFE_SIZE_BUCKETS
    )
    want = np.array([(sizes <= b).sum() for b in SAFE_SIZE_BUCKETS])
    assert got.tolist() == want.tolist()
    assert _delta(after, before, "dvp_safe_set_size_sum") == pytest.approx(sizes.sum())
    pruned = -np.expm1(logmass)  # 1 - Z_S
    assert pruned.max() > 0  # min_p = 0.02 prunes on the tiny model
    got = _buckets(after, "dvp_pruned_mass", PRUNED_MASS_BUCKETS) - _buckets(
        before, "dvp_pruned_mass", PRUNED_MASS_BUCKETS
    )
    want = np.array([(pruned <= b).sum() for b in PRUNED_MASS_BUCKETS])
    assert got.tolist() == want.tolist()
    assert _delta(after, before, "dvp_pruned_mass_sum") == pytest.approx(pruned.sum(), rel=1e-6)

    assert after["dvp_rollouts_admitted"] == 0 and after["dvp_queue_depth"] == 0
    assert after["dvp_queue_capacity"] == 16 + 1024  # --max-batch 16, default --max-queue
    assert after["dvp_admission_gate_open"] == 1
    assert after["dvp_policy_version"] == 0


def test_metrics_is_prometheus_text(server: str) -> None:
    r = httpx.get(f"{server}/metrics", timeout=60)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(r.text)}
    for name in (
        "dvp_http_requests",
        "dvp_http_request_duration_seconds",
        "dvp_tokens",
        "dvp_batch_size",
        "dvp_queue_depth",
        "dvp_safe_set_size",
        "dvp_pruned_mass",
        "dvp_rollout_first_chunk_seconds",
    ):
        assert name in names, name
