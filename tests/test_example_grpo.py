"""examples/grpo.py runs end to end on the tiny model against a real server, so it cannot rot.

A short-lived torch-engine server with ``--weights-root`` serves the tiny model; the
example trains for a few steps with DVP on and off, pushing weights every step.
The tiny random model never solves the addition task, so the reward is replaced by
one that varies within a group (the parity of the completion's length): the
advantages are non-zero, the weights change, and the pushes carry them.
"""

from __future__ import annotations

import csv
import importlib.util
import math
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import torch
from _ops import own_server
from conftest import ServerProcess
from safetensors.torch import load_file

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "grpo.py"
STEPS = 3


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("grpo_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def weights_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, Path]]:
    root = tmp_path_factory.mktemp("grpo-weights")
    with own_server(
        tiny_model_dir, tmp_path_factory.mktemp("grpo-srv"), "--weights-root", str(root)
    ) as s:
        yield s, root


def args(url: str, model: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--url",
        url,
        "--model",
        str(model),
        "--weights-dir",
        str(weights),
        "--out",
        str(out),
        "--steps",
        str(STEPS),
        "--prompts",
        "2",
        "--n",
        "4",
        "--max-tokens",
        "4",
        "--eval-every",
        "2",
        "--eval-size",
        "4",
        "--lr",
        "1e-3",
        "--seed",
        "1",
        *extra,
    ]


@pytest.mark.slow  # 5 s idle, 2 min on the busy 2-core machine: a server and two runs
@pytest.mark.parametrize(
    "flags",
    [
        ("--dvp", "--min-p", "0.01", "--correction", "token-tis"),
        ("--no-dvp",),
        ("--dvp", "--min-p", "0.01", "--correction", "token-tis", "--minibatches", "2"),
    ],
)
def test_grpo_trains_pushes_and_logs(
    weights_server: tuple[ServerProcess, Path],
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flags: tuple[str, ...],
) -> None:
    server, root = weights_server
    grpo = load_example()
    monkeypatch.setattr(grpo, "reward", lambda text, answer: float(len(text or "") % 2))
    start = httpx.get(f"{server.base_url}/v1/weights").json()["policy_version"]
    out = tmp_path / "out"
    assert grpo.main(args(server.base_url, tiny_model_dir, root / "run", out, *flags)) == 0

    rows = list(csv.DictReader((out / "steps.csv").open()))
    train = [r for r in rows if r["step"] and int(r["step"]) <= STEPS]
    assert [int(r["step"]) for r in train] == [1, 2, 3]
    # the initial push, then one push per step: step k samples with version start + k
    assert [int(r["policy_version"]) for r in train] == [start + k for k in (1, 2, 3)]
    info = httpx.get(f"{server.base_url}/v1/weights").json()
    assert info["policy_version"] == start + 1 + STEPS
    assert info["source"].endswith("step-00003")
    for r in train:
        for key in ("reward_mean", "k3", "abs_logratio_p99", "abs_logratio_max", "loss"):
            assert math.isfinite(float(r[key])), (key, r)
        assert float(r["tokens"]) > 0
    assert rows[0]["eval_acc"] != "" and rows[-1]["eval_acc"] != ""  # steps 1 and final
    if flags[0] == "--dvp":
        assert all(float(r["safe_size_mean"]) < 49152 for r in train)
        assert all(0 < float(r["pruned_mass"]) < 1 for r in train)
    else:
        assert all(float(r["safe_size_mean"]) == 49152 for r in train)
    if "--minibatches" in flags:  # two AdamW steps per batch, logged as their mean
        assert all(math.isfinite(float(r["clip_frac"])) for r in train)
    # the pushed weights are the trained ones: they differ from the start
    pushed = load_file(str(root / "run" / "step-00003" / "model.safetensors"))
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert pushed.keys() == initial.keys()
    assert any(not torch.equal(pushed[k], initial[k]) for k in initial)
    assert not (root / "run" / "step-00002").exists()  # older pushes are removed
    png = (out / "steps.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_grpo_plot_compares_runs(tmp_path: Path) -> None:
    grpo = load_example()
    rows = [
        {
            "run": "a",
            "step": s,
            "reward_mean": 0.5,
            "eval_acc": "",
            "k3": 1e-3,
            "abs_logratio_p99": 0.1,
            "abs_logratio_max": 0.3,
        }
        for s in (1, 2)
    ]
    for name in ("a", "b"):
        grpo.write_csv(rows, tmp_path / f"{name}.csv")
    assert (
        grpo.main(
            [
                "--plot",
                str(tmp_path / "a.csv"),
                str(tmp_path / "b.csv"),
                "--out",
                str(tmp_path / "cmp.png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"


def test_grpo_without_weights_root_says_how_to_fix(
    server: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    grpo = load_example()
    with pytest.raises(SystemExit, match="--weights-root"):
        grpo.main(args(server, tiny_model_dir, tmp_path / "w", tmp_path / "out"))


def test_reward_is_exact_match() -> None:
    load_example()  # puts examples/ on sys.path: the task module the examples share
    task = importlib.import_module("_addition")
    assert task.reward("7", 7) == 1.0 and task.reward(" 7 ", 7) == 1.0
    assert task.reward("7, (", 7) == 0.0 and task.reward("17", 7) == 0.0
    assert task.reward(None, 7) == 0.0
    prompt, answer = task.problem(__import__("random").Random(0))
    a, b = prompt.splitlines()[-1].rstrip("=").split("+")
    assert answer == int(a) + int(b) and prompt.startswith("2+3=5\n")
