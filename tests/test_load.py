"""Load: 64 concurrent async clients x 10 requests against the real tiny-model server.

Every request must succeed, and every rollout must be complete and consistent:
all columns the same length, every sampled token inside its step's safe set,
``|S_t|`` equal to the set's length, ``masked = logprob - logmass``, one policy
version. ``bench/load.py`` runs the bigger version and records the numbers.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _ops import metrics, own_server
from dvp_client import AsyncClient
from dvp_schemas import Rollout

CLIENTS = 64
REQUESTS = 10
MAX_TOKENS = 4
MIN_P = 0.05


def check_rollout(r: Rollout, where: str) -> None:
    """Raise AssertionError if the rollout is incomplete or inconsistent."""
    t = len(r.token_ids)
    assert 1 <= t <= MAX_TOKENS and r.finish_reason in ("length", "stop"), where
    assert r.finish_reason == "stop" or t == MAX_TOKENS, where
    assert r.logprobs is not None and r.safe_logmass is not None and r.safe_token_ids is not None
    columns = (r.logprobs, r.masked_logprobs, r.safe_logmass, r.safe_sizes)
    assert all(len(c) == t for c in columns), where
    assert len(r.safe_token_ids.offsets) == t + 1, where
    for step, token in enumerate(r.token_ids):
        ids = r.safe_token_ids.step(step)
        assert token in ids and len(ids) == r.safe_sizes[step], (where, step)
        lp, mlp, lz = r.logprobs[step], r.masked_logprobs[step], r.safe_logmass[step]
        assert lp is not None and lz is not None
        assert math.isclose(mlp, lp - lz, abs_tol=1e-5) and mlp <= 1e-6 and lz <= 1e-6
    assert r.policy_version == 0, where


async def _client(base: str, c: int) -> list[str]:
    """One client's ``REQUESTS`` sequential requests; returns error descriptions."""
    errors: list[str] = []
    async with AsyncClient(base, max_retries=0) as client:
        for i in range(REQUESTS):
            where = f"client {c} request {i}"
            try:
                batch = await client.rollouts(
                    [f"load test {c} {i}"],
                    max_tokens=MAX_TOKENS,
                    seed=c * REQUESTS + i,
                    pruning={"min_p": MIN_P},
                    return_safe_token_ids=True,
                    return_text=False,
                )
                assert len(batch.rollouts) == 1, where
                check_rollout(batch.rollouts[0], where)
            except Exception as exc:
                errors.append(f"{where}: {type(exc).__name__}: {exc}")
    return errors


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server of its own: one torch thread (see ``tests/_ops.py``), batches of 32."""
    with own_server(tiny_model_dir, tmp_path_factory.mktemp("load"), "--max-batch", "32") as s:
        yield s.base_url


@pytest.mark.slow
def test_64_clients_x_10_requests(server: str) -> None:
    before = metrics(server)

    async def run() -> list[Any]:
        return await asyncio.gather(*(_client(server, c) for c in range(CLIENTS)))

    errors = [e for errs in asyncio.run(run()) for e in errs]
    assert not errors, f"{len(errors)} errors; first: {errors[:3]}"
    after = metrics(server)
    total = CLIENTS * REQUESTS
    ended = sum(v for k, v in after.items() if k.startswith("dvp_rollouts_total{")) - sum(
        v for k, v in before.items() if k.startswith("dvp_rollouts_total{")
    )
    assert ended == total
    assert after.get("dvp_admission_rejected_total", 0) == before.get(
        "dvp_admission_rejected_total", 0
    )
    ok = 'dvp_http_requests_total{method="POST",route="/v1/rollouts",status="200"}'
    assert after[ok] - before.get(ok, 0) == total
    assert after["dvp_rollouts_admitted"] == 0
