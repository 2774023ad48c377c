"""The vLLM engine's pieces without a running engine (fast).

- ``derive_steps``: safe sets, masked / full log-probs and log Z_S from the raw
  top-K, against the float64 full-vocabulary reference of tests/_dvp_reference.py
  (random logits, several seeds and rules); steps whose token is outside the
  set are flagged and their set includes it. Tolerance ``ATOL = 2e-5``: raw
  log-probs are float32 (rounding ~1e-6 of values ~10) and the derivation adds a
  float32 logsumexp.
- ``read_flat_topk`` on vLLM's real ``FlatLogprobs`` layouts.
- the rule cap (``effective_rule``, ``effective_top_k``), the engine arguments the
  service forces on CPU, the sampling parameters, the engine factory.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _dvp_reference import lse, rule_set
from dvp_schemas import PruningRule
from dvp_server.config import ServerConfig
from dvp_server.engines import factory
from dvp_server.engines.base import EngineError, EngineParams
from dvp_server.engines.vllm._args import (
    CPU_KV_CACHE_BYTES,
    VllmSettings,
    effective_top_k,
    setup_cpu_env,
)
from dvp_server.engines.vllm._steps import TopK, derive_steps, read_flat_topk
from dvp_server.service.params import effective_rule

ATOL = 2e-5
V, K = 400, 20
RULES = [
    (1.0, PruningRule(min_p=0.05, top_k=K)),
    (0.7, PruningRule(min_p=0.02, top_k=12, top_p=0.9)),
    (1.3, PruningRule(top_k=8)),
    (1.0, PruningRule(top_k=K, top_p=0.8)),
    (0.0, PruningRule(top_k=K)),
    (1e-6, PruningRule(min_p=0.1, top_k=K)),  # below 1e-5: greedy, as vLLM
]


def _raw_steps(seed: int, t: int) -> np.ndarray:
    """Raw log-probs ``(t, V)`` (float64) of peaked random logits."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((t, V)) * 2.5
    return z - np.array([lse(row) for row in z])[:, None]


def _top_k(raw: np.ndarray, y: np.ndarray) -> TopK:
    order = np.argsort(-raw, axis=1, kind="stable")[:, :K]
    lps = np.take_along_axis(raw, order, axis=1).astype(np.float32)
    sampled_lp = raw[np.arange(len(y)), y].astype(np.float32)
    return TopK(sampled=y.astype(np.int64), sampled_lp=sampled_lp, ids=order, lps=lps)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("temperature", "rule"), RULES)
def test_derive_steps_matches_the_full_vocabulary_reference(
    seed: int, temperature: float, rule: PruningRule
) -> None:
    t = 40
    raw = _raw_steps(seed, t)
    rng = np.random.default_rng(100 + seed)
    greedy = temperature < 1e-5
    t_ref = 0.0 if greedy else temperature
    sets = [rule_set(raw[s], t_ref, rule.min_p, rule.top_k, rule.top_p) for s in range(t)]
    # Steps 0..29 sample inside S; 30..34 a top-K token outside S (if any); 35..39 a
    # token below the top-K: both must come back flagged, with y added to S.
    y = np.array([rng.choice(np.flatnonzero(sets[s])) for s in range(t)])
    order = np.argsort(-raw, axis=1, kind="stable")
    for s in range(30, 40):
        pool = order[s, :K] if s < 35 else order[s, K:]
        outside = [v for v in pool if not sets[s][v]]
        if outside:
            y[s] = outside[0]
    out = derive_steps(_top_k(raw, y), temperature, rule, with_ids=True)
    assert out.safe_ids is not None and out.safe_offsets is not None
    for s in range(t):
        expect_out = not sets[s][y[s]]
        assert bool(out.outside[s]) == expect_out, f"step {s}"
        ref_set = sets[s].copy()
        ref_set[y[s]] = True  # a flagged step's set includes y
        ids = out.safe_ids[out.safe_offsets[s] : out.safe_offsets[s + 1]]
        assert ids.tolist() == np.flatnonzero(ref_set).tolist(), f"step {s}"
        assert out.sizes[s] == ref_set.sum()
        u = raw[s] / (1.0 if greedy else temperature)
        assert out.masked[s] == pytest.approx(u[y[s]] - lse(u[ref_set]), abs=ATOL)
        if greedy or temperature == 1.0:
            assert out.logprobs[s] == pytest.approx(raw[s, y[s]], abs=ATOL)
            assert out.logmass[s] == pytest.approx(lse(raw[s][ref_set]), abs=ATOL)
            assert out.masked[s] == pytest.approx(out.logprobs[s] - out.logmass[s], abs=ATOL)
        else:
            assert math.isnan(out.logprobs[s]) and math.isnan(out.logmass[s])
    flagged = sum(not sets[s][y[s]] for s in range(t))
    assert int(out.outside.sum()) == flagged and (greedy or flagged > 0)


def test_derive_steps_without_ids_and_empty() -> None:
    raw = _raw_steps(5, 6)
    y = np.argmax(raw, axis=1)
    out = derive_steps(_top_k(raw, y), 1.0, PruningRule(min_p=0.1, top_k=K), with_ids=False)
    assert out.safe_ids is None and out.safe_offsets is None
    assert not out.outside.any() and (out.sizes >= 1).all()
    empty = derive_steps(_top_k(raw[:0], y[:0]), 1.0, PruningRule(top_k=K), with_ids=True)
    assert empty.masked.shape == (0,) and empty.safe_offsets is not None
    assert empty.safe_offsets.tolist() == [0]


def _flat(raw: np.ndarray, y: np.ndarray) -> Any:
    """vLLM's FlatLogprobs as its output processor fills it: K + 1 rows per step."""
    logprobs = pytest.importorskip("vllm.logprobs")
    flat = logprobs.FlatLogprobs()
    top = _top_k(raw, y)
    for s in range(len(y)):
        logprobs.append_logprobs_for_next_position(
            flat,
            [int(y[s]), *top.ids[s].tolist()],
            [float(top.sampled_lp[s]), *top.lps[s].tolist()],
            [None] * (K + 1),
            1 + int((raw[s] > raw[s, y[s]]).sum()),
            K,
        )
    return flat


def test_read_flat_topk_on_vllm_layouts() -> None:
    raw = _raw_steps(9, 12)
    y = np.argsort(-raw, axis=1)[:, 0].copy()
    y[::3] = np.argsort(-raw, axis=1)[::3, K + 5]  # some sampled tokens below the top-K
    flat = _flat(raw, y)
    ref = _top_k(raw, y)
    got = read_flat_topk(flat, 2, 10, K)
    assert got.sampled.tolist() == y[2:10].tolist()
    np.testing.assert_array_equal(got.ids, ref.ids[2:10])
    np.testing.assert_allclose(got.lps, ref.lps[2:10])
    # DELTA aggregation re-appends positions through dicts: K rows when y is in the top-K.
    merged = type(flat)()
    merged.extend(flat)
    widths = np.subtract(merged.end_indices, merged.start_indices)
    assert set(widths.tolist()) == {K, K + 1}
    again = read_flat_topk(merged, 0, 12, K)
    assert again.sampled.tolist() == y.tolist()
    assert [set(r) for r in again.ids.tolist()] == [set(r) for r in ref.ids.tolist()]
    with pytest.raises(ValueError, match="fewer than K"):
        read_flat_topk(flat, 0, 3, K + 2)


def test_effective_rule_caps_top_k_at_k() -> None:
    assert effective_rule(PruningRule(min_p=0.1), None) == PruningRule(min_p=0.1)
    assert effective_rule(PruningRule(min_p=0.1), K).top_k == K
    assert effective_rule(PruningRule(top_k=5), K).top_k == 5
    with pytest.raises(ValueError, match=f"top_k={K + 1}"):
        effective_rule(PruningRule(top_k=K + 1), K)
    params = EngineParams(temperature=1.0, max_tokens=4, rule=PruningRule(), seed=0)
    assert effective_top_k(params, K) == K
    with pytest.raises(ValueError, match=r"pruning\.top_k=64"):
        effective_top_k(
            EngineParams(temperature=1.0, max_tokens=4, rule=PruningRule(top_k=64), seed=0), K
        )


def test_engine_args_force_the_cpu_settings(vllm_tiny_model_dir: Path) -> None:
    pytest.importorskip("vllm")
    from dvp_server.engines.vllm._args import engine_args

    a = engine_args(vllm_tiny_model_dir, VllmSettings(max_logprobs=64), cpu=True)
    assert a.enforce_eager is True and a.enable_chunked_prefill is False
    assert a.max_model_len == 512 and a.max_num_batched_tokens >= a.max_model_len
    assert a.kv_cache_memory_bytes == CPU_KV_CACHE_BYTES
    assert (a.logprobs_mode, a.max_logprobs, a.dtype) == ("raw_logprobs", 64, "float32")
    gpu = engine_args(
        vllm_tiny_model_dir,
        VllmSettings(gpu_memory_utilization=0.5, tensor_parallel_size=2, max_model_len=256),
        cpu=False,
    )
    assert gpu.enable_chunked_prefill is None and gpu.enforce_eager is False
    assert gpu.kv_cache_memory_bytes is None and gpu.gpu_memory_utilization == 0.5
    assert (gpu.tensor_parallel_size, gpu.max_model_len) == (2, 256)
    with pytest.raises(ValueError, match="above the model's own 512"):
        engine_args(vllm_tiny_model_dir, VllmSettings(max_model_len=1024), cpu=True)


def test_sampling_params_map_the_rule_in_order() -> None:
    pytest.importorskip("vllm")
    from dvp_server.engines.vllm._args import sampling_params
    from vllm.sampling_params import RequestOutputKind

    rule = PruningRule(min_p=0.05, top_k=7, top_p=0.9)
    p = EngineParams(temperature=0.8, max_tokens=9, rule=rule, seed=2**62, stop_token_ids=(5,))
    sp = sampling_params(p, 7, 16)
    assert (sp.temperature, sp.min_p, sp.top_k, sp.top_p) == (0.8, 0.05, 7, 0.9)
    assert (sp.n, sp.seed, sp.max_tokens, sp.logprobs, sp.stop_token_ids) == (1, 2**62, 9, 7, [5])
    assert sp.flat_logprobs and not sp.detokenize  # no stop strings: no detokenizing
    assert sp.output_kind == RequestOutputKind.DELTA and sp.stream_interval == 16
    with_stop = sampling_params(
        EngineParams(temperature=1.0, max_tokens=9, rule=rule, seed=0, stop=("x",)), 7, 16
    )
    assert with_stop.detokenize and with_stop.stop == ["x"]


def test_cpu_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "")
    setup_cpu_env(VllmSettings())
    cores = sorted(os.sched_getaffinity(0))
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, cores))
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    setup_cpu_env(VllmSettings())
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0"  # the user's choice stays


def test_factory_picks_and_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert factory.resolve_engine_name("torch") == "torch"
    with pytest.raises(ValueError, match="engine must be one of"):
        factory.resolve_engine_name("tensorrt")
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with caplog.at_level(logging.WARNING):
        assert factory.resolve_engine_name("auto") == "torch"
    assert "not importable" in caplog.text
    with pytest.raises(ValueError, match="engine 'vllm' needs the vllm package"):
        factory.resolve_engine_name("vllm")


def test_factory_builds_engines(vllm_tiny_model_dir: Path) -> None:
    pytest.importorskip("vllm")
    from dvp_server.engines.torch.engine import TorchEngine
    from dvp_server.engines.vllm.engine import VllmEngine

    torch_engine = factory.build_engine(ServerConfig(engine="torch"), vllm_tiny_model_dir)
    assert isinstance(torch_engine, TorchEngine)
    config = ServerConfig(engine="vllm", max_logprobs=64, max_batch=8, kv_cache_bytes=1 << 28)
    engine = factory.build_engine(config, vllm_tiny_model_dir)
    assert isinstance(engine, VllmEngine)  # built, not started: no processes yet
    assert engine.settings.max_logprobs == 64 and engine.settings.max_num_seqs == 8
    assert engine.settings.kv_cache_bytes == 1 << 28
    assert engine.info.capabilities.max_top_k == 64 and engine.state == "starting"


def test_engine_refuses_work_before_start(vllm_tiny_model_dir: Path) -> None:
    pytest.importorskip("vllm")
    from dvp_server.engines.vllm.engine import VllmEngine

    engine = VllmEngine(vllm_tiny_model_dir)
    params = EngineParams(temperature=1.0, max_tokens=2, rule=PruningRule(), seed=0)
    with pytest.raises(EngineError, match="not running"):
        asyncio.run(anext(engine.generate("r", [1, 2], params)))
