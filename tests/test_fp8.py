"""FP8 (e4m3) weight rounding of the torch engine (``--quantize fp8``, ``engines/torch/_fp8.py``).

Against an independent float64 reference of the same scheme (scales ``fp32(amax /
448)`` per 128 x 128 block or per row, ``q = e4m3(fp32(w / s))`` rounded to nearest
even with numpy arithmetic, ``w' = q * s``): equal bit for bit, and within the
e4m3 bound per element. Then the engine: its linears are the rounded weights (the
head and embeddings are not), rollouts are valid, and a weight update rounds the
new tensors again and the prepacked kernels use them.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from dvp_schemas import PruningRule
from dvp_server.engines.base import EngineParams
from dvp_server.engines.torch import _fp8
from dvp_server.engines.torch._kernels import PackedLinear
from dvp_server.engines.torch.engine import TorchEngine

SHAPES = [(300, 200), (128, 256), (64, 64), (1, 7)]


def _round_e4m3_ref(x: np.ndarray) -> np.ndarray:
    """Round float64 values to e4m3fn, nearest even: 3 mantissa bits, normals >= 2^-6."""
    ax = np.abs(x)
    exp = np.floor(np.log2(np.where(ax > 0, ax, 1.0)))
    ulp = np.exp2(np.maximum(exp, -6.0) - 3.0)  # subnormal step 2^-9
    q = np.rint(x / ulp) * ulp  # np.rint: half to even
    return np.clip(q, -448.0, 448.0)


def _reference(w: torch.Tensor, mode: str, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``(w', s_full)`` of the scheme, ``w`` float32 ``(out, in)``."""
    w64 = w.double().numpy()
    out, inn = w64.shape
    if mode == "channel":
        amax = np.abs(w64).max(axis=1, keepdims=True)
        amax_full = np.broadcast_to(amax, w64.shape)
    else:
        amax_full = np.zeros_like(w64)
        for i in range(0, out, block):
            for j in range(0, inn, block):
                tile = np.abs(w64[i : i + block, j : j + block])
                amax_full[i : i + block, j : j + block] = tile.max()
    s = np.where(amax_full > 0, (amax_full / 448.0).astype(np.float32), np.float32(1.0))
    s = s.astype(np.float64)
    x = (w64 / s).astype(np.float32).astype(np.float64)  # the fp32 division, correctly rounded
    return _round_e4m3_ref(x) * s, s


def _weight(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Random weights over ~8 decades of magnitude (normals and subnormals of e4m3)."""
    gen = torch.Generator().manual_seed(seed)
    mag = torch.exp(torch.randn(shape, generator=gen, dtype=torch.float64) * 3.0) * 1e-2
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    w = (mag * sign).float()
    if shape[0] > 128 and shape[1] > 128:
        w[128:256, 128:] = 0.0  # an all-zero block: scale 1, exact zeros
    return w


@pytest.mark.parametrize("mode", ["block", "channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dequantized_weights_equal_float64_reference(
    mode: str, dtype: torch.dtype, seed: int
) -> None:
    for shape in SHAPES:
        w = _weight(shape, seed)
        ref, _ = _reference(w, mode)
        got = _fp8.round_weight(w, mode, dtype=dtype)
        assert got.dtype == dtype
        want = torch.from_numpy(ref).to(dtype)
        assert torch.equal(got, want), (shape, (got != want).sum())
        if dtype == torch.float32:
            rel = float(
                (got.double() - torch.from_numpy(ref)).norm() / torch.from_numpy(ref).norm()
            )
            assert rel < 2.0**-24  # only the final rounding to float32


@pytest.mark.parametrize("mode", ["block", "channel"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rounding_error_within_e4m3_bound(mode: str, seed: int) -> None:
    for shape in SHAPES:
        w = _weight(shape, seed)
        q, scale = _fp8.quantize(w, mode)
        assert q.dtype == torch.float8_e4m3fn
        deq = _fp8.dequantize(q, scale, mode, dtype=torch.float64)
        _, s = _reference(w, mode)
        s_t = torch.from_numpy(s)
        x = w.double() / s_t
        # half an e4m3 ulp (relative 2^-4 for normals, 2^-10 absolute below 2^-6),
        # plus the fp32 rounding of w / s (relative 2^-24)
        bound = s_t * (
            torch.maximum(x.abs() * 2.0**-4, torch.full_like(x, 2.0**-10)) + x.abs() * 2.0**-23
        )
        err = (deq - w.double()).abs()
        assert bool((err <= bound).all()), float((err / bound).max())
        # the bound is tight: some elements use a good part of it
        assert float((err / bound).max()) > 0.5
        # the scales: each block (row) reaches 448 at its max, none exceeds it
        assert float(q.float().abs().max()) <= 448.0
        nonzero = scale != 1.0
        if mode == "block":
            full = _fp8._expand(scale, w.shape, mode, _fp8.BLOCK)
            ratio = (w.abs() / full).amax()
            assert math.isclose(float(ratio), 448.0, rel_tol=1e-6)
        assert bool(nonzero.any())


def test_relative_error_per_channel_is_e4m3_sized() -> None:
    """Gaussian weights: the per-row relative error is near e4m3's ~2-3 %, far above bf16's."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(256, 384, generator=gen) * 0.02
    for mode in ("block", "channel"):
        err = (_fp8.round_weight(w, mode) - w).norm(dim=1) / w.norm(dim=1)
        assert 0.01 < float(err.mean()) < 0.04, (mode, float(err.mean()))
    bf16 = (w.bfloat16().float() - w).norm() / w.norm()
    assert float(bf16) < 0.005


@pytest.fixture(scope="module")
def fp8_engine(tiny_dir: Path) -> Iterator[TorchEngine]:
    eng = TorchEngine(tiny_dir, max_batch=4, threads=1, quantize="fp8")
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.shutdown())


def test_engine_serves_rounded_linears(fp8_engine: TorchEngine, ref_model: torch.nn.Module) -> None:
    assert fp8_engine.info.capabilities.quantization == "fp8-e4m3-block128"
    ref = dict(ref_model.named_parameters())
    got = dict(fp8_engine.model.named_parameters())
    linears = _fp8.fp8_linears(fp8_engine.model)
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down per layer
    for name in linears:
        want = torch.from_numpy(_reference(ref[name].detach(), "block")[0]).float()
        assert torch.equal(got[name].detach(), want), name
        assert not torch.equal(got[name].detach(), ref[name].detach())
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert name not in linears
        assert torch.equal(got[name].detach(), ref[name].detach()), name


async def _one_rollout(eng: TorchEngine, seed: int) -> dict[str, list[float]]:
    params = EngineParams(
        temperature=1.0,
        max_tokens=8,
        seed=seed,
        rule=PruningRule(min_p=0.01),
        return_safe_token_ids=True,
    )
    out: dict[str, list[float]] = {"ids": [], "lp": [], "mlp": [], "lz": []}
    async for chunk in eng.generate(f"r{seed}", [1, 2, 3, 4], params):
        out["ids"] += list(chunk.token_ids)
        out["lp"] += list(chunk.logprobs)
        out["mlp"] += list(chunk.masked_logprobs)
        out["lz"] += list(chunk.safe_logmass)
    return out


def test_rollouts_valid_and_update_requantizes(
    fp8_engine: TorchEngine, ref_model: torch.nn.Module
) -> None:
    r = asyncio.run(_one_rollout(fp8_engine, 0))
    assert len(r["ids"]) >= 1
    assert all(0 <= t < fp8_engine.vocab_size for t in r["ids"])
    for lp, mlp, lz in zip(r["lp"], r["mlp"], r["lz"], strict=True):
        assert lp <= 0 and mlp <= 0 and lz <= 0 and math.isclose(mlp, lp - lz, abs_tol=1e-5)

    name = "model.layers.0.mlp.down_proj.weight"
    lin = _fp8.fp8_linears(fp8_engine.model)[name]
    assert isinstance(lin, PackedLinear)
    x = torch.randn(3, lin.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = lin(x)
    new = ref_model.get_parameter(name).detach() * 1.5 + 1e-3
    version = asyncio.run(fp8_engine.load_weights({name: new}))
    assert version == 1
    want = torch.from_numpy(_reference(new, "block")[0]).float()
    assert torch.equal(lin.weight.detach(), want)  # rounded again, from the sent fp32
    with torch.inference_mode():
        after = lin(x)  # the packed kernel uses the new rounded weight
    ref = x.double() @ want.double().T
    assert float((after.double() - ref).norm() / ref.norm()) < 1e-5
    assert not torch.allclose(after, before)
    r2 = asyncio.run(_one_rollout(fp8_engine, 1))
    assert len(r2["ids"]) >= 1


def test_unknown_mode_refused(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="quantize"):
        TorchEngine(tiny_dir, quantize="int4")
    with pytest.raises(ValueError, match="mode"):
        _fp8.quantize(torch.zeros(2, 2), "tensor")
