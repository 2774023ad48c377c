"""Weight files for vLLM's in-place reload, and the cache salt of a weights version.

The engine hands vLLM a folder of links to a checkpoint's files (vLLM loads folders;
the links keep an upload's bytes for restarts), and every request carries the
version it was admitted under as ``cache_salt`` (``engine.py``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..base import EngineError

__all__ = ["link_weights", "load_lora", "reload_weights", "version_salt"]


def link_weights(weights: Sequence[Path]) -> Path:
    """A new folder of links to ``weights`` (vLLM reloads folders), kept for restarts.

    Hard links when the file system allows (an upload's staging file may be
    deleted after the load; a hard link keeps its bytes), else symbolic links.
    """
    folder = Path(tempfile.mkdtemp(prefix="dvp-vllm-weights-"))
    for i, f in enumerate(weights):
        src, dst = Path(f).resolve(), folder / f"{i:05d}-{Path(f).name}"
        try:
            os.link(src, dst)
        except OSError:
            os.symlink(src, dst)
    return folder


def version_salt(version: int) -> str:
    """vLLM's ``cache_salt`` of a request admitted at ``version``: prefix blocks are
    shared only between requests of one version."""
    return f"dvp-v{version}"


async def reload_weights(
    llm: Any, folder: Path, version: int, recompute: bool = False, lora: Path | None = None
) -> None:
    """vLLM's workers read the safetensors in ``folder`` and rebuild every kernel derived
    from the weights (``_worker.py``: vLLM's own reload leaves a tied head's CPU kernel
    on the old weights), and with ``lora`` load the policy adapter slot from that folder
    (``_lora.py``); then the prefix cache is reset (KV of the old weights).

    Raises:
        EngineError: vLLM failed the reload.
    """
    kwargs: dict[str, Any] = {"weights_path": str(folder), "version": version}
    if lora is not None:
        kwargs["lora_path"] = str(lora)
    try:
        await llm.collective_rpc("dvp_reload_weights", kwargs=kwargs)
    except Exception as exc:
        raise EngineError(f"vLLM failed to reload the weights: {exc}") from exc
    # False while running requests hold blocks (keep): the salt keeps them apart
    await llm.reset_prefix_cache(reset_running_requests=recompute)


async def load_lora(llm: Any, folder: Path, version: int, recompute: bool = False) -> None:
    """vLLM's workers load the policy adapter slot from ``folder`` in place and stamp
    later steps ``version`` (``_worker.py``); then the prefix cache is reset.

    Raises:
        ValueError: vLLM refused the adapter (the previous one still serves).
    """
    try:
        await llm.collective_rpc(
            "dvp_load_lora", kwargs={"lora_path": str(folder), "version": version}
        )
    except Exception as exc:
        raise ValueError(f"vLLM failed to load the adapter: {exc}") from exc
    await llm.reset_prefix_cache(reset_running_requests=recompute)
