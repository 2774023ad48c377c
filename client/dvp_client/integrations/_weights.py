"""Push a trainer's weights to dvp-serve: save as safetensors, ``POST /v1/weights``.

Used by the trainer integrations (:mod:`dvp_client.integrations.trl`). Tied embeddings
are written once, under the input embedding's name (what a tied checkpoint holds and
what the server expects); PEFT models are refused, since the server loads whole
checkpoints, not adapters.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from .._client import Client
from .._exceptions import APIStatusError

__all__ = ["WeightPusher", "check_pushable", "checkpoint_tensors"]


def check_pushable(model: Any) -> None:
    """Raise ``ValueError`` for models whose weights cannot be pushed as a checkpoint."""
    if _has_adapters(model):
        raise ValueError(
            "PEFT adapters are not supported: the server loads whole checkpoints. Merge the "
            "adapter first (model = model.merge_and_unload()) and train the merged model, or "
            "train without peft_config."
        )


def _has_adapters(model: Any) -> bool:
    """A peft ``PeftModel``, or a transformers model with adapters loaded into it."""
    if getattr(model, "_hf_peft_config_loaded", False):
        return True
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


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

    def __init__(self, client: Client, weights_dir: str | Path) -> None:
        self.client, self.weights_dir = client, Path(weights_dir).resolve()
        self.version = int(client.request("GET", "/v1/weights")["policy_version"])
        self._last: Path | None = None

    def push(self, model: torch.nn.Module, tag: str) -> int:
        """Save ``model`` as ``<weights_dir>/<tag>/model.safetensors`` and load it.

        Returns:
            The new policy version.

        Raises:
            RuntimeError: the server refused the checkpoint (message says why and how to
                fix the usual cause) or the version did not go up by one.
        """
        from safetensors.torch import save_file

        target = self.weights_dir / tag
        target.mkdir(parents=True, exist_ok=True)
        save_file(checkpoint_tensors(model), str(target / "model.safetensors"))
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
