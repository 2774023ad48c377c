"""examples/jax_grpo.py runs end to end on the tiny model against a real server.

A short-lived torch-engine server (fp32) with ``--weights-root`` serves the tiny
model; the example trains three steps in a subprocess (JAX only: the test checks that
torch was never imported there), pushing weights every step. Before each update the
trainer's and the engine's ``log pi_S(y)`` are one function of the same weights, so
they must agree within 2e-4 on every token, also after pushes of updated weights; the
version rises by one per step and the pushed file holds the trained weights. The
tiny random model never solves the task, so the example's ``--reward parity`` (the
completion length's parity) gives advantages that vary within a group.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from _ops import own_server
from safetensors.numpy import load_file

pytest.importorskip("jax")
pytest.importorskip("optax")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "jax_grpo.py"
STEPS = 3
AGREEMENT = 2e-4


@pytest.mark.slow  # 40 s on the 2-core machine: a server, a JAX compile, three steps
def test_jax_grpo_trains_pushes_and_agrees_with_the_engine(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "weights"
    root.mkdir()
    with own_server(tiny_model_dir, tmp_path / "srv", "--weights-root", str(root)) as server:
        start = httpx.get(f"{server.base_url}/v1/weights").json()["policy_version"]
        out = tmp_path / "out"
        cmd = [
            sys.executable, str(EXAMPLE), "--url", server.base_url, "--model", str(tiny_model_dir),
            "--weights-dir", str(root / "run"), "--out", str(out), "--steps", str(STEPS),
            "--prompts", "2", "--n", "4", "--max-tokens", "4", "--min-p", "0.01",
            "--correction", "token-tis", "--reward", "parity", "--lr", "1e-3",
            "--eval-every", "0", "--seed", "1",
        ]  # fmt: skip
        paths = [str(ROOT / d) for d in ("client", "schemas", "server")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "JAX_PLATFORMS": "cpu"}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        info = httpx.get(f"{server.base_url}/v1/weights").json()

    rows = list(csv.DictReader((out / "steps.csv").open()))
    assert [int(x["step"]) for x in rows] == [1, 2, 3]
    # the initial push, then one push per step: step k samples with version start + k
    assert [int(x["policy_version"]) for x in rows] == [start + k for k in (1, 2, 3)]
    assert info["policy_version"] == start + 1 + STEPS
    assert info["source"].endswith("step-00003")
    for x in rows:
        assert float(x["tokens"]) > 0
        assert float(x["abs_dlogp_max"]) < AGREEMENT, x
        assert 0 < float(x["safe_size_mean"]) < 49152 and 0 < float(x["pruned_mass"]) < 1
        for key in ("reward_mean", "k3", "loss", "grad_norm"):
            assert np.isfinite(float(x[key])), (key, x)
    assert any(float(x["grad_norm"]) > 0 for x in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["torch_imported"] is False
    pushed = load_file(str(root / "run" / "step-00003" / "model.safetensors"))
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert pushed.keys() == initial.keys()
    assert all(pushed[k].dtype == initial[k].dtype for k in initial)
    assert any(not np.array_equal(pushed[k], initial[k]) for k in initial)
