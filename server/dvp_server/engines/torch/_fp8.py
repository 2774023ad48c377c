"""FP8 (e4m3) weight rounding for the torch engine's linear layers (``--quantize fp8``).

The scheme is DeepSeek-V3's block-wise FP8 (what vLLM and SGLang serve for FP8
checkpoints), applied to a full-precision weight ``W`` ``(out, in)``:

- the weight is cut into 128 x 128 blocks (edge blocks smaller); per block
  ``s = fp32(amax|W_block| / 448)`` (448 = largest finite e4m3fn), or 1 where the
  block is all zero; ``mode="channel"``: one scale per output row instead;
- ``q = e4m3(fp32(W / s))``: float32 division, then round-to-nearest-even to
  float8 e4m3fn (3 mantissa bits, exponent bias 7, subnormals below 2^-6 with step
  2^-9; ``|q| <= 448``), done by ``torch.float8_e4m3fn``;
- the engine computes with ``W' = q * s``, formed exactly in float64 and rounded
  once to the engine dtype.

Per element ``|q - W/s| <= max(2^-4 |W/s|, 2^-10)`` (half an e4m3 ulp, relative
2^-4 for normals; the subnormal step's half 2^-10 below 2^-6), so ``|W' - W| <=
s * max(2^-4 |W/s|, 2^-10)`` before the final cast.

Only ``nn.Linear`` weights are rounded (attention and MLP projections); the
embeddings, norms, biases and the output head (``lm_head``, usually tied to the
embeddings) stay in the engine dtype, as FP8 serving stacks keep them. Activations
are not quantized (W8A16). The trainer keeps its full-precision weights: every
weight update is rounded again from the tensors it sends.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = [
    "BLOCK",
    "E4M3_MAX",
    "MODES",
    "REPORTED",
    "dequantize",
    "fp8_linears",
    "quantize",
    "reported_mode",
    "requantize",
    "round_model",
    "round_weight",
]

BLOCK = 128
E4M3_MAX = 448.0
#: ``--quantize`` value -> scale layout.
MODES: dict[str, str] = {"fp8": "block", "fp8-channel": "channel"}
#: ``--quantize`` value -> the name ``/v1/models`` reports (``capabilities.quantization``).
REPORTED: dict[str, str] = {"fp8": "fp8-e4m3-block128", "fp8-channel": "fp8-e4m3-channel"}


def reported_mode(reported: str) -> str:
    """The scale layout of a reported quantization name (:data:`REPORTED`'s values).

    Raises:
        ValueError: a name this module does not produce.
    """
    for flag, name in REPORTED.items():
        if name == reported:
            return MODES[flag]
    raise ValueError(f"unknown quantization {reported!r}; known: {sorted(REPORTED.values())}")


def quantize(weight: Tensor, mode: str = "block", block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """Round a 2-D weight to e4m3 with per-block (or per-row) float32 scales.

    Args:
        weight: ``(out, in)``, any float dtype (converted to float32 first).
        mode: ``"block"`` (``block x block`` tiles) or ``"channel"`` (one scale per row).
        block: tile side for ``mode="block"``.

    Returns:
        ``q``: ``(out, in)`` ``torch.float8_e4m3fn``; ``scale``: float32, ``(ceil(out /
        block), ceil(in / block))`` for blocks, ``(out, 1)`` for channels.

    Raises:
        ValueError: not 2-D, or an unknown mode.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {list(weight.shape)}")
    if mode not in ("block", "channel"):
        raise ValueError(f"mode must be 'block' or 'channel', got {mode!r}")
    w = weight.detach().to(torch.float32)
    amax = w.abs().amax(dim=1, keepdim=True) if mode == "channel" else _block_amax(w, block)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (w / _expand(scale, w.shape, mode, block)).to(torch.float8_e4m3fn)
    return q, scale


def dequantize(
    q: Tensor,
    scale: Tensor,
    mode: str = "block",
    block: int = BLOCK,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``W' = q * s`` in float64 (exact: 4 by 24 significant bits), rounded once to ``dtype``.

    Args:
        q: ``(out, in)`` float8 e4m3fn from :func:`quantize`; scale: its scales.

    Returns:
        ``(out, in)`` in ``dtype``.
    """
    full = _expand(scale.to(torch.float64), q.shape, mode, block)
    return (q.to(torch.float64) * full).to(dtype)


def round_weight(weight: Tensor, mode: str = "block", dtype: torch.dtype | None = None) -> Tensor:
    """``dequantize(quantize(weight))`` in ``dtype`` (default the weight's own)."""
    q, scale = quantize(weight, mode)
    return dequantize(q, scale, mode, dtype=dtype or weight.dtype)


def fp8_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears whose weights are rounded: parameter name -> module.

    Every ``nn.Linear`` (subclasses included) except the output head and any
    linear whose weight is shared with another module (a tied embedding).
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    owners: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    found: dict[str, nn.Linear] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod is not head and owners[id(mod.weight)] == 1:
            found[f"{name}.weight"] = mod
    return found


def requantize(linears: Mapping[str, nn.Linear], tensors: Mapping[str, Tensor], mode: str) -> int:
    """Copy the rounded ``tensors[name]`` into each named linear's weight, in place.

    The in-place copy bumps the weight's version, so a prepacked kernel re-packs.

    Args:
        linears: from :func:`fp8_linears`; names outside it are skipped.
        tensors: full-precision weights by parameter name.

    Returns:
        How many weights were rounded.
    """
    done = 0
    with torch.no_grad():
        for name, t in tensors.items():
            lin = linears.get(name)
            if lin is not None:
                lin.weight.copy_(round_weight(t, mode, dtype=lin.weight.dtype))
                done += 1
    return done


def round_model(model: nn.Module, dtype: torch.dtype, mode: str) -> dict[str, nn.Linear]:
    """Cast a float32 model to ``dtype`` with its linears rounded from float32, in place.

    Args:
        model: loaded in float32 (the precision the rounding starts from).
        dtype: the compute dtype.
        mode: ``"block"`` or ``"channel"``.

    Returns:
        The rounded linears (:func:`fp8_linears`), for :func:`requantize` on updates.
    """
    linears = fp8_linears(model)
    source = {name: lin.weight.detach() for name, lin in linears.items()}
    model.to(dtype)  # a new tensor per parameter unless dtype is float32
    requantize(linears, source, mode)
    return linears


def _block_amax(w: Tensor, block: int) -> Tensor:
    """Per-tile ``max |w|`` of ``(out, in)``: ``(ceil(out / block), ceil(in / block))``."""
    out, inn = w.shape
    pad_o, pad_i = -out % block, -inn % block
    a = nn.functional.pad(w.abs(), (0, pad_i, 0, pad_o))  # zeros never raise an amax
    rows, cols = a.shape[0] // block, a.shape[1] // block
    return a.reshape(rows, block, cols, block).amax(dim=(1, 3))


def _expand(scale: Tensor, shape: torch.Size, mode: str, block: int) -> Tensor:
    """Scales broadcast to the weight's ``shape``."""
    if mode == "channel":
        return scale.expand(shape)
    full = scale.repeat_interleave(block, dim=0).repeat_interleave(block, dim=1)
    return full[: shape[0], : shape[1]]
