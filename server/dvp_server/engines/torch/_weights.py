"""Weight loading for the torch engine: read safetensors, check, copy in place.

Checking happens before anything is copied, so a bad tensor leaves the model as
it was. Copies go into the existing parameters (``param.copy_``): no new
allocation, tied weights stay tied, and the dtype is converted to the model's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

__all__ = ["WeightsInput", "copy_weights", "read_weights"]

WeightsInput = Sequence[Path] | Mapping[str, torch.Tensor]


def read_weights(weights: WeightsInput) -> dict[str, torch.Tensor]:
    """A name -> tensor dict from safetensors files (or a mapping, passed through).

    Raises:
        ValueError: a tensor name appears in two files, or a file is not safetensors.
    """
    if isinstance(weights, Mapping):
        return dict(weights)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in weights:
        try:
            loaded = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{Path(path).name}: cannot read safetensors: {exc}") from exc
        for name in loaded:
            if name in tensors:
                raise ValueError(f"tensor {name!r} appears in two files")
        tensors.update(loaded)
    return tensors


def copy_weights(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> int:
    """Copy ``tensors`` into the model's parameters / persistent buffers of the same name.

    Tensors the mapping leaves out keep their values (the server's update route
    requires every tensor of the checkpoint; this function allows a subset).

    Returns:
        The number of tensors copied.

    Raises:
        ValueError: an unknown name, a shape that differs, or a non-float tensor;
            the message names the tensor. Nothing is copied then.
    """
    targets: dict[str, torch.Tensor] = dict(model.named_parameters())
    targets.update(model.named_buffers())
    for name, t in tensors.items():
        if name not in targets:
            raise ValueError(f"tensor {name!r} is not a tensor of the model")
        if tuple(t.shape) != tuple(targets[name].shape):
            raise ValueError(
                f"tensor {name!r} has shape {list(t.shape)}, the model's is "
                f"{list(targets[name].shape)}"
            )
        if not t.is_floating_point():
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, not a float")
    with torch.no_grad():
        for name, t in tensors.items():
            targets[name].copy_(t)
    return len(tensors)
