"""bench/rl_workload.py without servers: the summary it reports, and flag parity.

The bench itself (two vLLM servers, minutes) is not run in CI. What is checked:
the numbers it reports are what its docstring says (medians, nearest-rank
percentiles, ours / vllm as the median of same-round ratios), and the two
servers it compares are given the same engine settings: ``vllm serve``'s
command line, parsed by vLLM's own parser, gives the same ``AsyncEngineArgs``
fields as our server's ``engine_args`` for the same settings.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench() -> ModuleType:
    sys.path.insert(0, str(ROOT / "bench"))  # its helpers sit next to it (_rl_servers.py)
    spec = importlib.util.spec_from_file_location("rl_workload", ROOT / "bench" / "rl_workload.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["rl_workload"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


rl = _bench()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_percentile_is_nearest_rank(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.exponential(size=int(rng.integers(1, 40))).tolist()
    ordered = sorted(values)
    for q in (0.01, 0.5, 0.9, 0.99, 1.0):
        k = max(1, int(np.ceil(q * len(values))))  # rank, 1-based
        assert rl.percentile(values, q) == ordered[k - 1]
    with pytest.raises(ValueError):
        rl.percentile([], 0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summary_medians_and_same_round_ratio(seed: int) -> None:
    rng = np.random.default_rng(seed)
    runs = []
    for rnd in range(5):
        for v in ("ours-json", "vllm"):
            secs = float(rng.uniform(10, 100))
            runs.append(rl.Run(v, rnd, secs, 256, 256 * 128, int(rng.integers(1e6, 1e7)), 1.0))
    runs = [r for r in runs if not (r.variant == "ours-json" and r.round == 4)]  # unpaired vllm
    by = {s.variant: s for s in rl.summarise(runs)}
    ours = [r for r in runs if r.variant == "ours-json"]
    base = {r.round: r for r in runs if r.variant == "vllm"}
    want = statistics.median(base[r.round].seconds / r.seconds for r in ours)
    assert by["ours-json"].ratio_vs_vllm == pytest.approx(want, rel=1e-12)
    assert len(by["ours-json"].ratios) == 4
    assert by["vllm"].ratio_vs_vllm is None
    assert by["ours-json"].tokens_per_s == pytest.approx(
        statistics.median(r.tokens / r.seconds for r in ours), rel=1e-12
    )
    assert by["ours-json"].p99_s == max(r.seconds for r in ours)
    total_bytes = sum(r.body_bytes for r in ours)
    assert by["ours-json"].bytes_per_token == pytest.approx(total_bytes / (4 * 256 * 128))
    text = rl.table(rl.summarise(runs))
    assert text.count("\n") == 3 and f"**{want:.2f}**" in text


@pytest.mark.vllm
def test_both_servers_get_the_same_engine_args(tmp_path: Path) -> None:
    """vllm serve's flags, parsed by vLLM, match our engine_args field by field."""
    pytest.importorskip("vllm")
    from dvp_server.engines.vllm._args import VllmSettings, engine_args
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    config = {"model_type": "llama", "max_position_embeddings": 4096}
    (tmp_path / "config.json").write_text(json.dumps(config))
    args = argparse.Namespace(dtype="float32", max_num_seqs=48, k=20)
    servers = rl.make_servers(args, tmp_path, 4096, tmp_path)
    cmd = servers["vllm"].cmd
    flags = cmd[cmd.index("vllm.entrypoints.openai.api_server") + 1 :]
    ns = make_arg_parser(FlexibleArgumentParser()).parse_args(flags)
    theirs = AsyncEngineArgs.from_cli_args(ns)
    ours_settings = VllmSettings(dtype="float32", max_num_seqs=48, max_logprobs=20)
    ours = engine_args(tmp_path, ours_settings, cpu=True)
    for name in (
        "model", "dtype", "max_model_len", "max_num_seqs", "max_logprobs",
        "enforce_eager", "kv_cache_memory_bytes", "enable_chunked_prefill",
        "max_num_batched_tokens", "seed",
    ):  # fmt: skip
        assert getattr(theirs, name) == getattr(ours, name), name
    # Only the log-prob mode differs, by design: ours returns log pi_S(y) from vLLM's
    # processed log-probs; vllm serve returns its raw top-K, as a trainer asks it today.
    assert (theirs.logprobs_mode, ours.logprobs_mode) == ("raw_logprobs", "processed_logprobs")
    ours_cmd = servers["ours"].cmd
    assert ours_cmd[ours_cmd.index("--max-batch") + 1] == "48"
    assert ours_cmd[ours_cmd.index("--engine") + 1] == "vllm"
