"""examples/async_grpo.py against a real torch-engine server on the tiny model.

Rollout actors keep requests in flight while the trainer steps and pushes with
``on_inflight="keep"``: the version rises by one per push and nothing drains; every
batch's token versions are at most the trainer's; tokens sampled by the trainer's own
weights over their own KV match the trainer at the fp32 floor (K3 <= 1e-8), and
tokens further behind than ``--max-staleness`` are dropped from the gradient.
"""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import httpx
import pytest
from _ops import own_server

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "async_grpo.py"
STEPS = 4


@pytest.mark.slow
def test_async_grpo_trains_while_rollouts_stream(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path_factory.mktemp("async-grpo-root")
    spec = importlib.util.spec_from_file_location("async_grpo_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    # the tiny random model solves nothing: a reward that varies within a group
    monkeypatch.setattr(ex, "reward", lambda text, answer: float(len(text or "") % 2))
    flags = ["--weights-root", str(root), "--weights-update-policy", "keep"]
    with own_server(tiny_model_dir, tmp_path_factory.mktemp("async-grpo-srv"), *flags) as s:
        start = int(httpx.get(f"{s.base_url}/v1/weights").json()["policy_version"])
        out = tmp_path_factory.mktemp("async-grpo-out")
        argv = ["--url", s.base_url, "--model", str(tiny_model_dir)]
        argv += ["--weights-dir", str(root / "run"), "--out", str(out), "--steps", str(STEPS)]
        argv += ["--prompts", "2", "--n", "4", "--max-tokens", "24", "--lr", "1e-3"]
        argv += ["--min-p", "0.01", "--actors", "2", "--max-staleness", "1", "--seed", "3"]
        assert ex.main(argv) == 0
        end = int(httpx.get(f"{s.base_url}/v1/weights").json()["policy_version"])
    assert end == start + 1 + STEPS  # the initial push, then one per step
    rows = list(csv.DictReader((out / "steps.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        trainer = int(r["trainer_version"])
        versions = [int(v) for v in r["versions"].strip("[]").split(",")]
        assert max(versions) <= trainer and min(versions) >= start + 1, r
        behind = int(r["behind_max"])
        assert behind == trainer - min(
            min(versions), *map(int, r["kv_versions"].strip("[]").split(","))
        )
        if behind > 1:
            assert int(r["tokens_dropped"]) > 0, r
        k3 = float(r["k3_same_version"])
        assert math.isnan(k3) or k3 <= 1e-8, r
    # the actors ran ahead: some batch was sampled by older weights than the trainer's
    assert any(int(r["behind_max"]) > 0 for r in rows)
