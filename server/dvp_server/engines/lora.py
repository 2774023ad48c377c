"""LoRA merging shared by the engines: ``W' = W + scale * B @ A`` from the base weights.

``service/adapter.py`` checks an adapter and says what its tensors are; the torch
engine merges into its weights with :func:`merged_weights` between two steps, and an
engine without its own adapter path is sent a full checkpoint merged the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["LoraWeights", "merged_weights"]

#: Parameter name -> (A ``(r, in)``, B ``(out, r)``).
LoraWeights = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def merged_weights(
    base: Mapping[str, torch.Tensor], lora: LoraWeights, scale: float
) -> dict[str, torch.Tensor]:
    """``W + scale * B @ A`` per adapted weight, computed in float64, returned in float32.

    PEFT's forward of a LoRA linear (dropout off) is ``x W^T + scale * (x A^T) B^T``,
    the same map as ``x (W + scale * B A)^T``.

    Args:
        base: parameter name -> the base weight ``(out, in)`` (never one already merged:
            the caller keeps the base aside, so nothing accumulates).
        lora: parameter name -> (A ``(r, in)``, B ``(out, r)``).
        scale: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA).

    Returns:
        Parameter name -> merged weight ``(out, in)`` (float32), for the names of ``lora``.
    """
    out = {}
    for name, (a, b) in lora.items():
        w = base[name].to(torch.float64) + scale * (b.to(torch.float64) @ a.to(torch.float64))
        out[name] = w.to(torch.float32)
    return out
