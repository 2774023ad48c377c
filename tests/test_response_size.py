"""The response-size guard follows the safe sets actually produced (real server).

A server with ``--max-response-bytes 8 MiB`` (torch engine, tiny model, V = 49152):
the worst case of 16 prompts x n = 4 x 64 tokens with id lists is ~1.2 GB, yet a
batch whose real sets are small gets its ids; one that drives every step's set
towards V (top_p 0.99 at T = 5) is stopped at the limit with a 422 naming
``return_safe_token_ids`` and the packed format, and the server keeps serving.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _ops import own_server

LIMIT = 8 << 20


def _body(temperature: float, pruning: dict[str, float], stream: bool = False) -> dict[str, Any]:
    return {
        "prompts": [[1, 2, 3, 4 + i] for i in range(16)],
        "n": 4,
        "sampling": {"max_tokens": 64, "temperature": temperature, "seed": 0},
        "pruning": pruning,
        "return_safe_token_ids": True,
        "stream": stream,
    }


@pytest.fixture(scope="module")
def base(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_dir = tmp_path_factory.mktemp("response-size")
    with own_server(tiny_dir, log_dir, "--max-response-bytes", str(LIMIT)) as server:
        yield server.base_url


def test_small_real_sets_get_their_ids(base: str) -> None:
    r = httpx.post(f"{base}/v1/rollouts", json=_body(0.05, {"min_p": 1e-3}), timeout=300)
    assert r.status_code == 200, r.text[:500]
    rollouts = r.json()["rollouts"]
    assert len(rollouts) == 64
    assert all(ro["safe_token_ids"] is not None for ro in rollouts)
    assert len(r.content) < LIMIT


@pytest.mark.parametrize("stream", [False, True])
def test_sets_near_v_are_stopped_at_the_limit(base: str, stream: bool) -> None:
    body = _body(5.0, {"top_p": 0.99}, stream)  # ~0.99 V ids per step
    r = httpx.post(f"{base}/v1/rollouts", json=body, timeout=300)
    if stream:  # the stream started before the sets were counted: its last event says it
        assert r.status_code == 200
        last = json.loads(r.text.splitlines()[-1])
        assert last["object"] == "error", last
        info = last["error"]
    else:
        assert r.status_code == 422, r.text[:500]
        info = r.json()["error"]
    assert info["param"] == "return_safe_token_ids"
    assert "packed" in info["message"] and "--max-response-bytes" in info["message"]
    ok = httpx.post(f"{base}/v1/rollouts", json={"prompts": [[1, 2]], "n": 1}, timeout=60)
    assert ok.status_code == 200


@pytest.mark.slow
def test_a_grpo_batch_of_smollm2_gets_its_ids_at_the_defaults(smollm2_server: str) -> None:
    """16 chat prompts x n = 4 x 64 tokens, id lists, min_p 1e-3, JSON, default limits."""
    body = {
        "prompts": [[{"role": "user", "content": f"What is {i} * 7?"}] for i in range(16)],
        "n": 4,
        "sampling": {"max_tokens": 64, "seed": 0},
        "pruning": {"min_p": 1e-3},
        "return_safe_token_ids": True,
    }
    r = httpx.post(f"{smollm2_server}/v1/rollouts", json=body, timeout=900)
    assert r.status_code == 200, r.text[:500]
    rollouts = r.json()["rollouts"]
    assert len(rollouts) == 64 and all(ro["safe_token_ids"] is not None for ro in rollouts)
