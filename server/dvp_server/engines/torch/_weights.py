"""Weight loading for the torch engine: read safetensors, check, copy in place.

Everything is read and checked before anything is copied, so a file that cannot
be read or a bad tensor leaves the model as it was (the previous weights keep
serving). The server checks files completely before this (``service/checkpoint.py``);
these checks hold for tensors given in process too. Copies go into the existing
parameters (``param.copy_``): no new allocation, tied weights stay tied, and the
dtype is converted to the model's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

__all__ = ["WeightsInput", "copy_weights", "read_named_tensors", "read_weights"]

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


def _check(name: str, t: torch.Tensor, target: torch.Tensor | None) -> None:
    """One tensor against the model's tensor of that name (see :func:`copy_weights`)."""
    if target is None:
        raise ValueError(f"tensor {name!r} is not a tensor of the model")
    if tuple(t.shape) != tuple(target.shape):
        raise ValueError(
            f"tensor {name!r} has shape {list(t.shape)}, the model's is {list(target.shape)}"
        )
    if target.is_floating_point() != t.is_floating_point() or (
        not t.is_floating_point() and t.dtype != target.dtype
    ):
        raise ValueError(f"tensor {name!r} has dtype {t.dtype}, the model's is {target.dtype}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"tensor {name!r} holds NaN or infinite values")


def copy_weights(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> int:
    """Copy ``tensors`` into the model's parameters / persistent buffers of the same name.

    Tensors the mapping leaves out keep their values (the server's update route
    requires every tensor of the checkpoint; this function allows a subset).

    Returns:
        The number of tensors copied.

    Raises:
        ValueError: an unknown name, a shape that differs, a non-float tensor for a
            float one (else a dtype that differs), or a NaN / infinite value; the
            message names the tensor. Nothing is copied then.
    """
    targets: dict[str, torch.Tensor] = dict(model.named_parameters())
    targets.update(model.named_buffers())
    for name, t in tensors.items():
        _check(name, t, targets.get(name))
    with torch.no_grad():
        for name, t in tensors.items():
            targets[name].copy_(t)
    return len(tensors)


def read_named_tensors(files: Sequence[Path], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The named tensors (float32) from safetensors files, each read alone.

    Raises:
        ValueError: a name none of the files holds.
    """
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in set(names) & set(f.keys()):
                out[name] = f.get_tensor(name).to(torch.float32)
    missing = sorted(set(names) - set(out))
    if missing:
        raise ValueError(f"tensor {missing[0]!r} is not in the base checkpoint")
    return out
