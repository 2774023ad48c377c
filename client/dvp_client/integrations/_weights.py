"""Push a trainer's weights to dvp-serve: save as safetensors, ``POST /v1/weights``.

Used by the trainer integrations (:mod:`dvp_client.integrations.trl`). Tied embeddings
are written once, under the input embedding's name (what a tied checkpoint holds and
what the server expects). A PEFT ``PeftModel`` (LoRA) is pushed as its adapter
(``sync="adapter"``: ``save_pretrained`` writes ``adapter_config.json`` and
``adapter_model.safetensors``, megabytes; the server serves it on its base weights), or
as the merged model (``sync="merged"``: ``W + scale * B @ A`` per adapted linear, for
servers that load checkpoints only). Adapters loaded into a plain transformers model
(``load_adapter``) are refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from .._client import Client
from .._exceptions import APIStatusError

__all__ = ["SYNC_MODES", "WeightPusher", "check_pushable", "checkpoint_tensors", "merged_tensors"]

#: How a PEFT model is pushed: its adapter only, or the merged weights.
SYNC_MODES = ("adapter", "merged")


def check_pushable(model: Any) -> None:
    """Raise ``ValueError`` for models whose weights cannot be pushed."""
    if getattr(model, "_hf_peft_config_loaded", False) and not is_peft_model(model):
        raise ValueError(
            "adapters loaded into a transformers model (load_adapter) are not supported: "
            "wrap the model with peft (get_peft_model / PeftModel.from_pretrained) or pass "
            "peft_config, and the adapter is pushed on its own"
        )


def is_peft_model(model: Any) -> bool:
    """A peft ``PeftModel``."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def merged_tensors(model: Any) -> dict[str, torch.Tensor]:
    """A LoRA ``PeftModel``'s weights as a checkpoint of its base model, each adapted
    linear merged (``W + sum over active adapters of scale * B @ A``, peft's
    ``get_delta_weight``), without changing the model (no ``merge_and_unload``)."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                layer: Any = module  # peft's Linear: get_delta_weight(adapter) -> (out, in)
                w = layer.get_base_layer().weight.detach().clone()
                for a in layer.active_adapters:
                    w += layer.get_delta_weight(a)
                merged[f"{name}.weight"] = w
    out = {}
    for name, t in checkpoint_tensors(base).items():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        out[name] = merged.get(name, t).contiguous()
    return out


def checkpoint_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each shared tensor once (tied embeddings: the input
    embedding's name, the first in ``state_dict`` order), detached and contiguous."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size(), t.shape)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


class WeightPusher:
    """Saves the policy under ``weights_dir`` (inside the server's ``--weights-root``) and
    loads it into every replica of ``client``; checks that ``policy_version`` goes up by
    one. The previous push's files are removed once the next one has been loaded.

    Attributes:
        version: the policy version the server serves after the last push.
    """

    def __init__(self, client: Client, weights_dir: str | Path, sync: str = "adapter") -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
        self.client, self.weights_dir, self.sync = client, Path(weights_dir).resolve(), sync
        self.version = int(client.request("GET", "/v1/weights")["policy_version"])
        self._last: Path | None = None

    def push(self, model: torch.nn.Module, tag: str) -> int:
        """Save ``model`` as ``<weights_dir>/<tag>/model.safetensors`` and load it (a
        ``PeftModel``: its adapter folder there, or the merged weights; ``sync``).

        Returns:
            The new policy version.

        Raises:
            RuntimeError: the server refused the checkpoint (message says why and how to
                fix the usual cause) or the version did not go up by one.
        """
        from safetensors.torch import save_file

        target = self.weights_dir / tag
        target.mkdir(parents=True, exist_ok=True)
        if not is_peft_model(model):
            save_file(checkpoint_tensors(model), str(target / "model.safetensors"))
        elif self.sync == "merged":
            save_file(merged_tensors(model), str(target / "model.safetensors"))
        else:  # adapter_config.json + adapter_model.safetensors (the adapter only)
            peft_model: Any = model
            peft_model.save_pretrained(str(target))
        try:
            replies = self.client.update_weights(target)
        except APIStatusError as err:
            raise RuntimeError(
                f"pushing weights to the server failed ({err.status_code}): {err}. The "
                f"server must run with --weights-root at or above {self.weights_dir} and "
                "serve the same architecture (tensor names, shapes) as the trained model."
            ) from err
        got = {r.policy_version for r in replies}
        if got != {self.version + 1}:
            raise RuntimeError(f"policy_version went {self.version} -> {sorted(got)}")
        self.version += 1
        if self._last is not None and self._last != target:
            shutil.rmtree(self._last, ignore_errors=True)  # the server has loaded it
        self._last = target
        return self.version
