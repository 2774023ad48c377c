"""The vLLM engine's pieces without a running engine (fast).

- :class:`DvpRuleProcessor` (the rule inside vLLM's sampler) on vLLM's own
  ``BatchUpdate`` / ``SamplingParams`` objects with random float32 logits: the
  logits it leaves finite are exactly the float64 reference set of the rule as
  sent (tests/_dvp_reference.py; no cap: sets of thousands of ids), untagged rows
  are untouched, the step index follows the live output list through adds,
  swaps and removals, and its records reach the API side through the real
  ZeroMQ channel (``StepChannel``). Scoring rows force the given token.
  Tolerance ``ATOL = 2e-5`` on log Z_S (float32 logsumexp of values ~10).
- ``chunk_fields`` / ``StepBuffer`` / ``read_sampled`` (vLLM's ``FlatLogprobs``).
- the engine arguments (processor, processed log-probs, the CPU settings), the
  sampling parameters (vLLM's min_p / top_k / top_p off, the rule in the tag),
  the V1 model runner requirement, the engine factory.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from _dvp_reference import lse, rule_set
from dvp_schemas import PruningRule
from dvp_server.config import ServerConfig
from dvp_server.engines import factory
from dvp_server.engines.base import EngineError, EngineParams
from dvp_server.engines.vllm._args import (
    CPU_KV_CACHE_BYTES,
    PROCESSOR_FQCN,
    VllmSettings,
    require_v1_model_runner,
    rule_tag,
    setup_cpu_env,
)
from dvp_server.engines.vllm._steps import StepBuffer, Steps, chunk_fields, read_sampled
from dvp_server.service.params import effective_rule

ATOL = 2e-5
V = 3000


def _processor() -> Any:
    pytest.importorskip("vllm")
    from dvp_server.engines.vllm._processor import DvpRuleProcessor

    return DvpRuleProcessor(SimpleNamespace(), torch.device("cpu"), False)


def _sp(tag: dict[str, Any] | None, temperature: float = 1.0) -> Any:
    from vllm import SamplingParams

    return SamplingParams(temperature=temperature, extra_args=tag)


def _update(added: list[tuple[int, Any, list[int]]], removed=(), moved=(), size=4) -> Any:  # type: ignore[no-untyped-def]
    from vllm.v1.sample.logits_processor import BatchUpdate

    return BatchUpdate(
        batch_size=size,
        removed=list(removed),
        added=[(i, sp, None, out) for i, sp, out in added],
        moved=list(moved),
    )


def _logits(seed: int, rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * 2.0  # float32, as vLLM's sampler input


CASES = [
    (0.7, PruningRule(min_p=1e-3)),
    (1.0, PruningRule(min_p=1e-4)),  # nearly the whole vocabulary: no cap
    (1.3, PruningRule(min_p=1e-3, top_k=50)),
    (1.0, PruningRule(min_p=1e-3, top_p=0.9)),
    (0.0, PruningRule(min_p=1e-3)),  # greedy: S = {argmax}
]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_processor_applies_the_rule_as_sent_and_ships_it(seed: int) -> None:
    from dvp_server.engines.vllm._channel import StepChannel
    from vllm.v1.sample.logits_processor import MoveDirectionality

    async def run() -> None:
        channel = StepChannel()
        await channel.start()
        try:
            proc = _processor()
            n = len(CASES) + 1  # the last row is untagged
            outputs: list[list[int]] = [[7] * j for j in range(n)]  # row j is at step j
            added = []
            for j, (t, rule) in enumerate(CASES):
                tag = rule_tag(f"k{j}", channel.addr, rule, temperature=t, with_ids=j != 2)
                added.append((j, _sp(tag, t), outputs[j]))
                channel.register(f"k{j}")
            added.append((n - 1, _sp(None), outputs[n - 1]))
            proc.update_state(_update(added, size=n))
            logits = _logits(seed, n)
            before = logits.clone()
            out = proc.apply(logits)
            assert torch.equal(out[n - 1], before[n - 1])  # untagged: untouched
            for j, (t, rule) in enumerate(CASES):
                z = before[j].double().numpy()
                ref = rule_set(z, t, rule.min_p, rule.top_k, rule.top_p)
                assert torch.isfinite(out[j]).numpy().tolist() == ref.tolist(), f"row {j}"
                assert torch.equal(out[j][ref], before[j][ref])  # S unchanged
                (rec,) = await channel.take(f"k{j}", j, j + 1)
                key, step, size, logmass, ids, score, version = rec
                assert (key, step, size, score) == (f"k{j}", j, int(ref.sum()), None)
                assert version == 0  # the weights version this process computes with
                u = z / (t if t > 0 else 1.0)
                assert logmass == pytest.approx(lse(u[ref]) - lse(u), abs=ATOL)
                if j == 2:
                    assert ids is None
                else:
                    assert ids.dtype == np.int32 and ids.tolist() == np.flatnonzero(ref).tolist()
            assert int(rule_set(before[1].double().numpy(), 1.0, 1e-4, None, 1.0).sum()) > 1000
            # Swap rows 0 and 1, drop row 2; the live output lists carry the steps on.
            outputs[0].append(1)
            outputs[1].append(1)
            proc.update_state(
                _update([], removed=[2], moved=[(0, 1, MoveDirectionality.SWAP)], size=n)
            )
            proc.apply(_logits(seed + 10, n))
            (r0,) = await channel.take("k0", 1, 2)  # now in batch row 1
            (r1,) = await channel.take("k1", 2, 3)
            assert (r0[0], r1[0]) == ("k0", "k1")
            assert 2 not in proc._rows and proc._rows[1].key == "k0"
        finally:
            await channel.close()

    asyncio.run(run())


def test_processor_forces_scored_tokens() -> None:
    from dvp_server.engines.vllm._channel import StepChannel

    async def run() -> None:
        channel = StepChannel()
        await channel.start()
        try:
            proc = _processor()
            given = [11, 2900]
            tag = rule_tag(
                "s",
                channel.addr,
                PruningRule(min_p=1e-2),
                temperature=0.8,
                with_ids=True,
                force=given,
                top_n=3,
            )
            output: list[int] = []
            channel.register("s")
            proc.update_state(_update([(0, _sp(tag, 0.0), output)], size=1))
            for step, y in enumerate(given):
                logits = _logits(50 + step, 1)
                before = logits[0].double().numpy()
                out = proc.apply(logits)
                assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [y]  # forced
                output.append(y)
                (rec,) = await channel.take("s", step, step + 1)
                ref = rule_set(before, 0.8, 1e-2, None, 1.0)
                u = before / 0.8
                y_, full, masked, in_s, top_ids, top_lps = rec[5]
                assert (y_, in_s, rec[2]) == (y, bool(ref[y]), int(ref.sum()))
                assert full == pytest.approx(u[y] - lse(u), abs=ATOL)
                if ref[y]:
                    assert masked == pytest.approx(u[y] - lse(u[ref]), abs=ATOL)
                else:
                    assert masked == -math.inf
                assert top_ids.tolist() == np.argsort(-u)[:3].tolist()
                np.testing.assert_allclose(top_lps, np.sort(u - lse(u))[::-1][:3], atol=ATOL)
        finally:
            await channel.close()

    asyncio.run(run())


def test_processor_refuses_vllm_filters_on_tagged_requests() -> None:
    proc = _processor()
    from vllm import SamplingParams

    tag = rule_tag("x", "ipc://none", PruningRule(min_p=0.1), temperature=1, with_ids=False)
    type(proc).validate_params(SamplingParams(extra_args=tag))
    type(proc).validate_params(SamplingParams(min_p=0.1))  # untagged: vLLM's business
    with pytest.raises(ValueError, match="min_p/top_k/top_p"):
        type(proc).validate_params(SamplingParams(min_p=0.1, extra_args=tag))


def _records(sizes: list[int], logmass: list[float], with_ids: bool) -> list[tuple[Any, ...]]:
    rng = np.random.default_rng(0)
    return [
        (
            "k",
            s,
            n,
            lm,
            np.sort(rng.choice(V, n, replace=False)).astype(np.int32) if with_ids else None,
            None,
            0,  # the weights version that computed the step
        )
        for s, (n, lm) in enumerate(zip(sizes, logmass, strict=True))
    ]


def test_chunk_fields_and_buffer() -> None:
    recs = _records([3, 1, 5], [-0.5, 0.0, -0.1], with_ids=True)
    steps = Steps(np.array([4, 5, 6]), np.array([-1.0, 0.0, -2.0], np.float32), recs)
    buf = StepBuffer()
    buf.add(Steps(steps.tokens[:1], steps.masked[:1], recs[:1]))
    buf.add(Steps(steps.tokens[1:], steps.masked[1:], recs[1:]))
    first = buf.ready(2, finished=False)  # 3 steps from two outputs: one chunk of 2
    assert [len(c) for c in first] == [2] and buf.size == 1
    assert [r[1] for r in first[0].records] == [0, 1] and first[0].tokens.tolist() == [4, 5]
    assert buf.ready(2, finished=False) == []  # a running rollout keeps the rest back
    (rest,) = buf.ready(2, finished=True)
    assert [r[1] for r in rest.records] == [2] and buf.size == 0
    f = chunk_fields(steps, with_ids=True)
    np.testing.assert_allclose(f["logprobs"], [-1.5, 0.0, -2.1], rtol=1e-6)
    assert f["safe_sizes"].tolist() == [3, 1, 5] and f["safe_offsets"].tolist() == [0, 3, 4, 9]
    assert f["safe_ids"].tolist() == [i for r in recs for i in r[4].tolist()]
    assert "safe_ids" not in chunk_fields(steps, with_ids=False)
    bad = Steps(steps.tokens, np.array([-1.0, -math.inf, 0.0], np.float32), recs)
    with pytest.raises(ValueError, match="step 1: sampled token outside the safe set"):
        chunk_fields(bad, with_ids=False)
    no_ids = _records([1, 1, 1], [0.0] * 3, with_ids=False)
    with pytest.raises(ValueError, match="no safe ids"):
        chunk_fields(Steps(steps.tokens, steps.masked, no_ids), with_ids=True)


def test_read_sampled_on_vllm_flat_logprobs() -> None:
    logprobs = pytest.importorskip("vllm.logprobs")
    flat = logprobs.FlatLogprobs()
    ys, lps = [5, 9, 1], [-0.25, -3.0, 0.0]
    for y, lp in zip(ys, lps, strict=True):  # logprobs=0: the sampled row only
        logprobs.append_logprobs_for_next_position(flat, [y], [lp], [None], 1, 0)
    ids, got = read_sampled(flat, 3)
    assert ids.tolist() == ys and got.tolist() == lps
    merged = type(flat)()
    merged.extend(flat)  # DELTA aggregation path
    assert read_sampled(merged, 3)[0].tolist() == ys
    assert read_sampled(flat, 0)[0].shape == (0,)


def test_effective_rule_is_the_rule_as_sent_without_a_cap() -> None:
    rule = PruningRule(min_p=1e-3)
    assert effective_rule(rule, None) == rule  # the vLLM engine advertises no cap now
    with pytest.raises(ValueError, match="top_k=21"):
        effective_rule(PruningRule(top_k=21), 20)  # an engine with a cap still refuses


def test_v1_model_runner_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    require_v1_model_runner()
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ValueError, match="Model Runner V2 does not load"):
        require_v1_model_runner()


def test_engine_args_force_the_cpu_settings(vllm_tiny_model_dir: Path) -> None:
    pytest.importorskip("vllm")
    from dvp_server.engines.vllm._args import engine_args

    a = engine_args(vllm_tiny_model_dir, VllmSettings(max_logprobs=64), cpu=True)
    assert a.enforce_eager is True and a.enable_chunked_prefill is False
    assert a.max_model_len == 512 and a.max_num_batched_tokens >= a.max_model_len
    assert a.kv_cache_memory_bytes == CPU_KV_CACHE_BYTES
    assert (a.logprobs_mode, a.max_logprobs, a.dtype) == ("processed_logprobs", 64, "float32")
    assert a.logits_processors == [PROCESSOR_FQCN]
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


def test_sampling_params_leave_the_rule_to_the_processor() -> None:
    pytest.importorskip("vllm")
    from dvp_server.engines.vllm._args import sampling_params
    from vllm.sampling_params import RequestOutputKind

    rule = PruningRule(min_p=0.05, top_k=7, top_p=0.9)
    p = EngineParams(temperature=0.8, max_tokens=9, rule=rule, seed=2**62, stop_token_ids=(5,))
    tag = rule_tag("k", "ipc://x", rule, temperature=0.8, with_ids=True)
    sp = sampling_params(p, tag, 16)
    assert (sp.temperature, sp.min_p, sp.top_k, sp.top_p) == (0.8, 0.0, 0, 1.0)  # vLLM's off
    assert sp.extra_args["dvp"] == {
        "key": "k",
        "addr": "ipc://x",
        "t": 0.8,
        "min_p": 0.05,
        "top_k": 7,
        "top_p": 0.9,
        "ids": True,
    }
    assert (sp.n, sp.seed, sp.max_tokens, sp.logprobs, sp.stop_token_ids) == (1, 2**62, 9, 0, [5])
    assert sp.flat_logprobs and not sp.detokenize  # no stop strings: no detokenizing
    assert sp.output_kind == RequestOutputKind.DELTA and sp.stream_interval == 16
    with_stop = sampling_params(
        EngineParams(temperature=1.0, max_tokens=9, rule=rule, seed=0, stop=("x",)), tag, 16
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


def test_cpu_env_without_cxx_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """No C++ compiler: vLLM's torch.compile'd sampler helpers run eagerly instead of
    killing the engine at the first rollout (no g++ in the CPU image)."""
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "")  # restored to unset afterwards
    monkeypatch.delenv("TORCH_COMPILE_DISABLE")
    monkeypatch.setenv("CXX", "dvp-no-such-compiler")
    setup_cpu_env(VllmSettings())
    assert os.environ["TORCH_COMPILE_DISABLE"] == "1"
    monkeypatch.delenv("TORCH_COMPILE_DISABLE")
    monkeypatch.setenv("CXX", sys.executable)  # a compiler is there: torch.compile stays on
    setup_cpu_env(VllmSettings())
    assert "TORCH_COMPILE_DISABLE" not in os.environ
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "0")
    monkeypatch.setenv("CXX", "dvp-no-such-compiler")
    setup_cpu_env(VllmSettings())
    assert os.environ["TORCH_COMPILE_DISABLE"] == "0"  # the user's choice stays


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
    assert engine.info.capabilities.max_top_k is None and engine.state == "starting"
    assert "logprobs" in engine.info.capabilities.exact_at_any_temperature


def test_engine_refuses_work_before_start(vllm_tiny_model_dir: Path) -> None:
    pytest.importorskip("vllm")
    from dvp_server.engines.vllm.engine import VllmEngine

    engine = VllmEngine(vllm_tiny_model_dir)
    params = EngineParams(temperature=1.0, max_tokens=2, rule=PruningRule(), seed=0)
    with pytest.raises(EngineError, match="not running"):
        asyncio.run(anext(engine.generate("r", [1, 2], params)))
