"""vLLM's runtime LoRA for the policy adapter (``--enable-lora``).

One adapter slot, id :data:`POLICY_LORA_ID`: every request (rollouts and scoring)
carries its :class:`LoRARequest`, and an adapter update replaces the slot's weights
in place (``load_inplace``) in the worker, between two steps, in the same call that
stamps the new weights version (``_worker.WeightsExtension.dvp_load_lora``). So a
rollout in flight across an update (``on_inflight`` keep / recompute) samples its
next token from the new adapter, exactly as it would from a new checkpoint, and each
token's version names the adapter that sampled it.

The base model alone is served as a zero adapter (``B = 0``: ``W + B A = W``
exactly), written at start (:func:`write_zero_adapter`): the slot is never empty, so
a request admitted before the first adapter needs no other LoRA id. A checkpoint
update puts the zero adapter back (the checkpoint is the new base, as on the torch
engine). The LoRA kernels run on every step while ``--enable-lora`` is on (the
decode cost in BENCHMARKS.md, "LoRA updates").
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ADAPTER_FILES",
    "POLICY_LORA_ID",
    "POLICY_LORA_NAME",
    "VLLM_LORA_RANKS",
    "check_lora_rank",
    "link_adapter",
    "policy_lora_request",
    "write_zero_adapter",
]

POLICY_LORA_ID = 1
POLICY_LORA_NAME = "dvp-policy"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
#: The ranks vLLM accepts as ``max_lora_rank`` (vllm/config/lora.py, ``MaxLoRARanks``).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def check_lora_rank(rank: int) -> int:
    """``--max-lora-rank`` as vLLM's ``max_lora_rank``.

    Raises:
        ValueError: not one of :data:`VLLM_LORA_RANKS` (the message names the flag).
    """
    if rank not in VLLM_LORA_RANKS:
        raise ValueError(
            f"--max-lora-rank {rank}: with --enable-lora, vLLM takes one of "
            f"{', '.join(map(str, VLLM_LORA_RANKS))} (adapters of any rank up to it are served)"
        )
    return rank


def policy_lora_request(folder: Path) -> Any:
    """The :class:`LoRARequest` every request carries (loaded from ``folder`` by the
    first request that needs it, e.g. after a restart)."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(POLICY_LORA_NAME, POLICY_LORA_ID, str(folder))


def link_adapter(folder: Path) -> Path:
    """A new folder of hard links (copies across file systems) to an adapter's two files:
    the caller's folder (an upload's) may be deleted once the update returns, and vLLM
    reads the folder again after a restart."""
    kept = Path(tempfile.mkdtemp(prefix="dvp-vllm-lora-"))
    for name in ADAPTER_FILES:
        try:
            os.link(Path(folder, name).resolve(), kept / name)
        except OSError:
            shutil.copyfile(Path(folder, name), kept / name)
    return kept


def write_zero_adapter(model_dir: Path) -> Path:
    """A new folder holding a rank-1 PEFT adapter on layer 0's ``q_proj`` with ``B = 0``:
    served, it leaves every logit of the base model unchanged.

    Shapes from the model's ``config.json``: ``A`` is ``(1, hidden_size)`` and ``B``
    ``(num_attention_heads * head_dim, 1)``, float32.
    """
    from safetensors.torch import save_file

    config = json.loads(Path(model_dir, "config.json").read_text())
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    out = heads * int(config.get("head_dim") or hidden // heads)
    folder = Path(tempfile.mkdtemp(prefix="dvp-vllm-lora-zero-"))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {
            f"{prefix}.lora_A.weight": torch.zeros(1, hidden),
            f"{prefix}.lora_B.weight": torch.zeros(out, 1),
        },
        str(folder / ADAPTER_FILES[1]),
    )
    adapter_config = {
        "peft_type": "LORA",
        "r": 1,
        "lora_alpha": 1,
        "target_modules": ["q_proj"],
        "bias": "none",
    }
    (folder / ADAPTER_FILES[0]).write_text(json.dumps(adapter_config))
    return folder
