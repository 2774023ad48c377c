"""The torch engine's fast kernels (engines/_kernels.py) against float64 references.

PackedLinear: ``x W^T + b`` from oneDNN-prepacked weights, re-packed when the
weight changes. grouped_decode_attention: one query row attending over a GQA
cache read in place. install / stock on a real (tiny, GQA) Llama: logits of a
prefill and decode steps against the same model in float64.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from dvp_server.engines.torch import _kernels
from dvp_server.engines.torch._kernels import PackedLinear, grouped_decode_attention
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache

pytestmark = pytest.mark.skipif(
    not _kernels.packing_works(torch.float32), reason="no oneDNN prepacked linears here"
)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def _packed(inp: int, out: int, dtype: torch.dtype, seed: int, bias: bool = True) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(inp, out, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, inp, generator=gen))
        if bias:
            lin.bias.copy_(torch.randn(out, generator=gen))
    lin.__class__ = PackedLinear
    return lin


def _ref_linear(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = x.double() @ lin.weight.detach().double().T
    return out + lin.bias.detach().double() if lin.bias is not None else out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(1, 96), (16, 96), (3, 7, 96), (130, 96)])
def test_packed_linear_matches_float64(seed: int, shape: tuple[int, ...]) -> None:
    lin = _packed(96, 200, torch.float32, seed, bias=seed != 1)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 10))
    with torch.inference_mode():
        out = lin(x)
    assert out.shape == (*shape[:-1], 200)
    assert lin.packed is not None  # the packed path ran
    assert _rel(out, _ref_linear(lin, x)) < 1e-6


def test_packed_linear_bfloat16() -> None:
    if not _kernels.packing_works(torch.bfloat16):
        pytest.skip("no bf16 oneDNN linears here")
    lin = _packed(128, 64, torch.bfloat16, 3)
    x = torch.randn(8, 128).to(torch.bfloat16)
    with torch.inference_mode():
        out = lin(x)
    assert _rel(out, _ref_linear(lin, x)) < 1e-2


def test_packed_linear_repacks_when_the_weight_changes() -> None:
    lin = _packed(32, 48, torch.float32, 4)
    x = torch.randn(5, 32)
    with torch.inference_mode():
        lin(x)
        first = lin.packed
        with torch.no_grad():  # in place, as copy_weights does
            lin.weight.copy_(torch.randn(48, 32))
        out = lin(x)
    assert lin.packed is not first
    assert _rel(out, _ref_linear(lin, x)) < 1e-6
    lin.weight.data = torch.randn(48, 32)  # replaced
    with torch.inference_mode():
        assert _rel(lin(x), _ref_linear(lin, x)) < 1e-6
    _kernels.forget_packed(nn.Sequential(lin))
    assert lin.packed is None


def test_packed_linear_falls_back_under_autograd() -> None:
    lin = _packed(16, 8, torch.float32, 5)
    x = torch.randn(4, 16, requires_grad=True)
    lin(x).sum().backward()  # the oneDNN op has no backward: F.linear must have run
    assert x.grad is not None
    assert lin.packed is None


def _naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """float64 softmax(q k^T / sqrt(D) + mask) v with the KV heads repeated; (B, 1, Hq, D)."""
    g = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(g, dim=1)
    vv = v.double().repeat_interleave(g, dim=1)
    s = q.double() @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, Hq, 1, K)
    s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1) @ vv).transpose(1, 2)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("b", "hq", "hkv", "k"), [(1, 4, 2, 5), (7, 9, 3, 40), (3, 8, 8, 17)])
def test_grouped_decode_attention_matches_float64(
    seed: int, b: int, hq: int, hkv: int, k: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    d = 16
    # the cache as the engine holds it: the first k positions of a longer buffer
    kbuf, vbuf = (torch.randn(b, hkv, k + 9, d, generator=gen) for _ in range(2))
    key, value = kbuf[:, :, :k], vbuf[:, :, :k]
    q = torch.randn(b, hq, 1, d, generator=gen)
    mask = torch.rand(b, 1, 1, k, generator=gen) > 0.3  # random padding
    mask[..., -1] = True  # a row always sees itself
    module = nn.Module()
    out, weights = grouped_decode_attention(module, q, key, value, mask)
    assert weights is None and out.shape == (b, 1, hq, d)
    assert _rel(out, _naive_attention(q, key, value, mask)) < 1e-6
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    out_add, _ = grouped_decode_attention(module, q, key, value, additive)
    assert _rel(out_add, _naive_attention(q, key, value, mask)) < 1e-6
    out_none, _ = grouped_decode_attention(module, q, key, value, None)
    full = torch.ones_like(mask)
    assert _rel(out_none, _naive_attention(q, key, value, full)) < 1e-6


def _decode_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: torch.Tensor):
    """Last-position logits of a left-padded prefill, then one decode step per column of
    ``steps`` (B, S): ``(S + 1, B, V)``."""
    cache = DynamicCache(config=model.config)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = [model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache)]
    nxt = pos[:, -1:] + 1
    for s in range(steps.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        out.append(
            model(input_ids=steps[:, s : s + 1], attention_mask=mask, position_ids=nxt,
                  past_key_values=cache)
        )  # fmt: skip
        nxt = nxt + 1
    return torch.stack([o.logits[:, -1].double() for o in out])


@pytest.mark.parametrize("seed", [0, 1])
def test_install_keeps_the_model_exact(tiny_model_dir: Path, seed: int) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    ref = copy.deepcopy(model).double()
    on = _kernels.install(model)
    assert on == {"packed_linear": True, "grouped_attention": True}
    assert model.config._attn_implementation == _kernels.ATTENTION
    gen = torch.Generator().manual_seed(seed)
    b, k, vocab = 5, 12, model.config.vocab_size
    ids = torch.randint(0, vocab, (b, k), generator=gen)
    lens = torch.randint(3, k + 1, (b,), generator=gen)
    mask = (torch.arange(k) >= k - lens[:, None]).long()  # left padding
    steps = torch.randint(0, vocab, (b, 4), generator=gen)
    with torch.inference_mode():
        fast = _decode_logits(model, ids, mask, steps)
        with _kernels.stock(model):
            assert model.config._attn_implementation == "sdpa"
            plain = _decode_logits(model, ids, mask, steps)
        assert model.config._attn_implementation == _kernels.ATTENTION
        exact = _decode_logits(ref, ids, mask, steps)
    assert _rel(fast, exact) < 1e-5
    assert _rel(plain, exact) < 1e-5
    assert any(m.packed is not None for m in model.modules() if isinstance(m, PackedLinear))
    twin = copy.deepcopy(model)  # a copy packs its own weights
    assert all(m.packed is None for m in twin.modules() if isinstance(m, PackedLinear))
