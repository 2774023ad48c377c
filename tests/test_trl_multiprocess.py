"""DVPGRPOTrainer under data parallelism: two CPU processes (torchrun, gloo) against a
real server on the tiny model, with a GRPO group split across the processes.

Checked, on both processes: every rollout carries the version just pushed and the
version goes up by exactly one per step (only the main process pushes; the others learn
the version); the two halves of the split group are different samples (the process index
is folded into the seed); trainer vs engine masked log-probs agree on every token at
both steps (the second step needs the gradients all-reduced, else the other process's
weights are not the ones pushed); the final parameters are equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("trl")
pytest.importorskip("accelerate")

from _ops import own_server
from conftest import ServerProcess
from dvp_client import Client
from dvp_client.integrations.trl import _check_parallelism

WORKER = Path(__file__).with_name("_trl_ddp_worker.py")
TOL = 2e-4  # trainer vs engine masked log-prob, every token


@pytest.fixture(scope="module")
def weights_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, Path]]:
    root = tmp_path_factory.mktemp("ddp-weights")
    with own_server(
        tiny_model_dir, tmp_path_factory.mktemp("ddp-srv"), "--weights-root", str(root)
    ) as s:
        yield s, root


def rows_of(generation: dict[str, list], prompt: str) -> list[tuple[int, ...]]:
    pairs = zip(generation["prompts"], generation["completions"], strict=True)
    return [tuple(c) for p, c in pairs if p == prompt]


@pytest.mark.slow  # a server and two TRL processes on the 2-core machine
def test_two_processes_share_one_push_per_step(
    weights_server: tuple[ServerProcess, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    server, root = weights_server
    client = Client(server.base_url)
    v0 = int(client.request("GET", "/v1/weights")["policy_version"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        str(tiny_model_dir),
        server.base_url,
        str(root / "ddp"),
        str(tmp_path),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in done.stderr.splitlines() if "Error" in line]
    assert done.returncode == 0, "\n".join(errors[:20]) + "\n" + done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]

    assert int(client.request("GET", "/v1/weights")["policy_version"]) == v0 + 2
    for r in ranks:
        assert r["num_processes"] == 2
        assert r["policy_versions"] == [v0 + 1, v0 + 2]  # one push per step, not one each
        for k, g in enumerate(r["generations"]):
            assert set(g["versions"]) == {v0 + 1 + k}
            assert len(g["prompts"]) == 6
        assert len(r["gaps"]) == 2 and max(r["gaps"]) < TOL, r["gaps"]
    for k in range(2):
        a, b = ranks[0]["generations"][k], ranks[1]["generations"][k]
        shared = set(a["prompts"]) & set(b["prompts"])
        assert len(shared) == 1, (a["prompts"], b["prompts"])
        prompt = shared.pop()
        mine, theirs = rows_of(a, prompt), rows_of(b, prompt)
        assert len(mine) == len(theirs) == 2
        assert mine != theirs  # the same prompt, different samples on each process
        assert not set(mine) & set(theirs), (mine, theirs)
    assert ranks[0]["params"] == ranks[1]["params"]  # gradients were all-reduced


@pytest.mark.parametrize(("fsdp", "stage", "refused"), [(True, None, "FSDP"), (False, 3, "ZeRO-3")])
def test_sharded_parameters_are_refused(fsdp: bool, stage: int | None, refused: str) -> None:
    plugin = None if stage is None else SimpleNamespace(zero_stage=stage)
    trainer = SimpleNamespace(
        is_fsdp_enabled=fsdp,
        accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)),
    )
    with pytest.raises(ValueError, match=f"{refused} is not supported.*--num_processes"):
        _check_parallelism(trainer)  # type: ignore[arg-type]


def test_replicated_parameters_pass() -> None:
    for plugin in (None, SimpleNamespace(zero_stage=2)):
        trainer = SimpleNamespace(
            is_fsdp_enabled=False,
            accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)),
        )
        _check_parallelism(trainer)  # type: ignore[arg-type]
