"""The FP8 path end to end on the tiny model: serve, diagnose, one GRPO step.

A real ``dvp-serve --quantize fp8`` (torch engine, fp32 compute) over the tiny
model; ``dvp-diagnose`` against it with small settings; one step of
``examples/grpo.py`` that pushes weights the server rounds again. Also the vLLM
engine's refusals of ``--quantize`` (no vLLM start needed) and the sequence
spread statistic against a direct computation.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import ServerProcess, start_server, stop_server
from dvp_server.config import ServerConfig
from dvp_server.diagnose.cli import app
from dvp_server.diagnose.stats import seq_spread_by_length
from dvp_server.engines.vllm._args import vllm_quantization
from test_example_grpo import args as grpo_args
from test_example_grpo import load_example
from typer.testing import CliRunner

STARTUP_S = 600.0
DIAG_ARGS = [
    "--rollouts", "8", "--samples-per-prompt", "4", "--max-tokens", "10", "--rho", "0.05",
    "--vocab-positions", "4", "--prompts-per-request", "2", "--no-progress", "--seed", "3",
]  # fmt: skip


@pytest.fixture(scope="module")
def fp8_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, Path]]:
    root = tmp_path_factory.mktemp("fp8-weights")
    log = tmp_path_factory.mktemp("fp8-srv") / "server.log"
    # the tiny model starts in seconds; a generous limit for a machine busy with other jobs
    args = ["--engine", "torch", "--threads", "1", "--quantize", "fp8", "--weights-root", str(root)]
    server = start_server(str(tiny_model_dir), log, args, STARTUP_S)
    try:
        yield server, root
    finally:
        stop_server(server)


@pytest.mark.slow  # ~10 s idle, about a minute on the busy 2-core machine
def test_fp8_serve_diagnose_and_grpo_step(
    fp8_server: tuple[ServerProcess, Path],
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, root = fp8_server
    card = httpx.get(f"{server.base_url}/v1/models").json()["data"][0]
    assert card["capabilities"]["quantization"] == "fp8-e4m3-block128"
    assert card["dtype"] == "float32"

    out = tmp_path / "diag"
    argv = ["--url", server.base_url, "--model", str(tiny_model_dir), "--out", str(out)]
    result = CliRunner().invoke(app, [*argv, *DIAG_ARGS])
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads((out / "diagnose.json").read_text())
    assert report["meta"]["quantization"] == "fp8-e4m3-block128"
    # fp8 weights vs the fp32 trainer: a real mismatch (an fp32 engine without it: ~1e-6)
    assert report["sampled"]["abs_dlogp_mean"] > 1e-3
    vocab = report["vocab"]
    # the local engine copy is rounded as the server rounds: it tracks the server's log-probs
    local, served = vocab["proxy_abs_dlogp_local"], vocab["proxy_abs_dlogp_server"]
    assert served > 1e-3 and abs(local - served) < 1e-3 * max(served, 1.0) + 1e-4
    for st in report["settings"]:
        lengths = [r["length"] for r in st["seq_by_length"]]
        assert lengths == sorted(lengths) and lengths[0] == 1
    assert "Sequence log ratio vs length" in (out / "diagnose.txt").read_text()

    grpo = load_example()
    monkeypatch.setattr(grpo, "reward", lambda text, answer: float(len(text or "") % 2))
    run = tmp_path / "grpo"
    start = httpx.get(f"{server.base_url}/v1/weights").json()["policy_version"]
    flags = grpo_args(
        server.base_url, tiny_model_dir, root / "run", run, "--dvp", "--min-p", "0.05"
    )
    flags[flags.index("--steps") + 1] = "1"
    assert grpo.main(flags) == 0
    rows = [r for r in csv.DictReader((run / "steps.csv").open()) if r["step"] == "1"]
    assert int(rows[0]["policy_version"]) == start + 1  # sampled after the initial push
    assert float(rows[0]["k3"]) > 0  # fp8 engine vs fp32 trainer
    assert httpx.get(f"{server.base_url}/v1/weights").json()["policy_version"] == start + 2


def test_vllm_quantize_is_passed_or_refused_by_name() -> None:
    assert vllm_quantization(None, "float32", cpu=False) is None
    assert vllm_quantization("fp8", "bfloat16", cpu=False) == "fp8_per_block"
    with pytest.raises(ValueError, match=r"--quantize fp8 .*--dtype bfloat16"):
        vllm_quantization("fp8", "float32", cpu=False)
    with pytest.raises(ValueError, match=r"--quantize fp8-channel .*torch engine only"):
        vllm_quantization("fp8-channel", "bfloat16", cpu=False)
    with pytest.raises(ValueError, match="quantize"):
        ServerConfig(quantize="int8")


@pytest.mark.parametrize("seed", [0, 1])
def test_seq_spread_matches_a_direct_computation(seed: int) -> None:
    g = np.random.default_rng(seed)
    n, t = 40, 16
    d = g.normal(0, 0.1, size=(n, t))
    lens = g.integers(1, t + 1, size=n)
    mask = np.arange(t)[None, :] < lens[:, None]
    rows = seq_spread_by_length(torch.tensor(d), torch.tensor(mask), [1, 4, 16])
    sd_tok = d[mask].std(ddof=1)
    for r in rows:
        L = int(r["length"])
        keep = lens >= L
        prefix = np.where(mask, d, 0.0)[keep, :L].sum(1)
        assert r["rollouts"] == keep.sum()
        assert r["std"] == pytest.approx(prefix.std(ddof=1), rel=1e-12)
        assert r["mean_abs"] == pytest.approx(np.abs(prefix).mean(), rel=1e-12)
        assert r["sqrt_l_ref"] == pytest.approx(sd_tok * np.sqrt(L), rel=1e-12)
    assert [int(r["length"]) for r in rows] == [1, 4, 16][: len(rows)]
