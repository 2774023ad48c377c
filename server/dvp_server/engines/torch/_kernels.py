"""Faster CPU kernels for the torch engine: prepacked oneDNN linears and copy-free GQA decode.

Two things cost the engine most beyond the arithmetic itself (measured on a
2-core AVX-512 EPYC, SmolLM2 fp32, one thread; BENCHMARKS.md "Torch engine"):

- ``aten::linear`` calls MKL's sgemm, which on AMD CPUs runs its AVX2 path:
  oneDNN with a weight prepacked once for the CPU's blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, what
  ``torch.compile``'s CPU freezing pass emits) does the same fp32 product about
  2x faster at every batch (1, 16, 64 rows and prefill);
- transformers' ``sdpa`` attention with a padding mask repeats every KV head
  ``num_key_value_groups`` times (``repeat_kv``: a copy of the whole cache per
  layer and step), and the SDPA CPU kernel is slow for one query row.

:func:`install` fixes both on one model, in place: every ``nn.Linear`` becomes a
:class:`PackedLinear` (same parameters and state dict; the packed copy is
rebuilt when the weight changes: in place, detected by its version counter, or
replaced), and the model's attention becomes ``"dvp_sdpa"``: for one query
position a grouped product over the cache as it is (no repeat, strided views
fine), otherwise transformers' SDPA path. Numbers are fp32 products summed in
another order: log-probs move by rounding only (~1e-6; tested against float64).
:func:`stock` switches both off for a block (the bench's ``generate()`` baseline).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

ATTENTION = "dvp_sdpa"
_PACKED_DTYPES = (torch.float32, torch.bfloat16)


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` that multiplies with a oneDNN-prepacked copy of its weight.

    ``y = x @ W^T + b``: ``x`` ``(..., in)``, ``W`` ``(out, in)``, ``y`` ``(..., out)``,
    all of the weight's dtype (fp32 or bf16). The packed copy is made on first use
    and again whenever ``weight`` is replaced or modified in place; with autograd
    recording, a dtype mismatch or ``enabled`` off, it is plain ``F.linear``.
    """

    enabled: bool = True

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (
            not self.enabled
            or torch.is_grad_enabled()
            or x.dtype != w.dtype
            or w.dtype not in _PACKED_DTYPES
        ):
            return F.linear(x, w, self.bias)
        key = (w.data_ptr(), w._version, w.dtype)
        cached = _PACKED.get(self)
        if cached is None or cached[0] != key:
            cached = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 64))
            _PACKED[self] = cached
        return torch.ops.mkldnn._linear_pointwise(x, cached[1], self.bias, "none", [], "")

    @property
    def packed(self) -> Tensor | None:
        """The packed weight copy in use (None before the first packed call)."""
        cached = _PACKED.get(self)
        return None if cached is None else cached[1]


#: Packed copies, out of the modules' ``__dict__`` (an opaque oneDNN tensor cannot be
#: deep-copied or pickled, and a copy of the module must not share a stale one).
_PACKED: weakref.WeakKeyDictionary[PackedLinear, tuple[tuple[int, int, torch.dtype], Tensor]] = (
    weakref.WeakKeyDictionary()
)


def packing_works(dtype: torch.dtype) -> bool:
    """Whether prepacked linears run here and agree with a float64 product (relative
    error below 1e-4 in fp32, 1e-2 in bf16)."""
    if dtype not in _PACKED_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        lin = nn.Linear(64, 48, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(48, 64, generator=gen))
        x = torch.randn(5, 64, generator=gen).to(dtype)
        lin.__class__ = PackedLinear
        with torch.inference_mode():
            out = lin(x).double()
        ref = x.double() @ lin.weight.detach().double().T + lin.bias.detach().double()
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        return bool(((out - ref).norm() / ref.norm()) < tol)
    except (RuntimeError, AttributeError) as exc:  # an op missing from this build
        log.warning("prepacked oneDNN linears unavailable (%s): using aten linear", exc)
        return False


def grouped_decode_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention for the transformers ``AttentionInterface`` (``"dvp_sdpa"``).

    One query position (a decode step): ``softmax(q k^T * scale + mask) v`` per
    head, with the ``Hq = G * Hkv`` query heads grouped by the KV head they read
    (head ``h`` reads KV head ``h // G``, as ``repeat_kv`` lays them out), so the
    cache is read in place. Otherwise (prefill, dropout) transformers' SDPA.

    Args:
        query: ``(B, Hq, 1, D)``; key, value: ``(B, Hkv, K, D)`` (views are fine).
        attention_mask: bool ``(B, 1, 1, K)`` (True = attend), or additive float,
            or None (attend everywhere).
        scaling: the softmax scale (default ``D ** -0.5``).

    Returns:
        ``(B, 1, Hq, D)`` in the query's dtype, and None (no attention weights).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, hq, q_len, d = query.shape
    hkv = key.shape[1]
    if q_len != 1 or dropout > 0.0 or hq % hkv:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = scaling if scaling is not None else d**-0.5
    q = query.reshape(b, hkv, hq // hkv, d)  # (B, Hkv, G, D)
    scores = torch.matmul(q, key.transpose(-1, -2)).mul_(scale)  # (B, Hkv, G, K)
    if attention_mask is not None:
        mask = attention_mask[:, :, -1:, :]  # (B, 1, 1, K)
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, value)  # (B, Hkv, G, D)
    return out.reshape(b, 1, hq, d), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, grouped_decode_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def install(model: nn.Module) -> dict[str, bool]:
    """Give ``model`` the fast kernels, in place; returns which ones are on.

    Prepacked linears only where :func:`packing_works` for the model's dtype; the
    grouped decode attention only for models that run transformers' attention
    interface (``config._attn_implementation`` is ``"sdpa"``).
    """
    dtype = next(model.parameters()).dtype
    packed = packing_works(dtype)
    if packed:
        for sub in model.modules():
            if type(sub) is nn.Linear:
                sub.__class__ = PackedLinear
    config: Any = getattr(model, "config", None)
    attention = config is not None and getattr(config, "_attn_implementation", None) == "sdpa"
    if attention:
        _register()
        config._attn_implementation = ATTENTION
    return {"packed_linear": packed, "grouped_attention": attention}


def forget_packed(model: nn.Module) -> None:
    """Drop every packed weight copy of ``model`` (rebuilt on next use): after a weight swap.

    The version check alone catches in-place copies; this also covers a weight
    replaced twice between two forwards by tensors that reuse one address.
    """
    for sub in model.modules():
        if isinstance(sub, PackedLinear):
            _PACKED.pop(sub, None)


@contextmanager
def stock(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with plain ``F.linear`` and transformers' ``sdpa`` inside the block."""
    linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
    config: Any = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    for m in linears:
        m.enabled = False
    if attention == ATTENTION:
        config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        for m in linears:
            m.enabled = True
        if attention == ATTENTION:
            config._attn_implementation = ATTENTION
