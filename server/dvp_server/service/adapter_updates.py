"""LoRA adapter updates: the adapter half of :class:`~.weights.WeightManager` (mixed in).

A PEFT LoRA folder (by path, or an unpacked upload) is checked completely first
(``adapter.py``: 422 naming ``path`` / ``body``), then served as base + adapter as the
next ``policy_version``, through the same gate as a checkpoint (``on_inflight``). How
the engine serves it (docs/lora.md):

- an engine with runtime LoRA (vLLM with ``--enable-lora``: ``load_adapter_dir``)
  loads the folder into its adapter slot (``served_as: "runtime"``);
- an engine with ``load_adapter`` (torch) merges it exactly into its weights;
- any other engine is sent a full checkpoint merged here from the base files.

Either way the adapter's files are kept (links under the staging folder), so a failed
``verify`` of a later checkpoint can serve this adapter again.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dvp_schemas import LoraAdapterInfo, WeightsUpdateResponse

from ..engines.lora import LoraWeights, merged_checkpoint
from ..errors import validation_error
from .adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter
from .checkpoint import CheckpointError

if TYPE_CHECKING:
    from ..config import ServerConfig
    from ..engines.base import Engine
    from .checkpoint import ModelManifest

__all__ = ["AdapterUpdates", "ServedLora", "keep_adapter"]

#: The adapter served now: its tensors, scale, and a kept copy of its folder.
ServedLora = tuple[LoraWeights, float, Path]


def keep_adapter(folder: Path, staging: Path, version: int) -> Path:
    """Hard links (copies across file systems) to an adapter folder's two files in
    ``staging/adapter-<version>``; older ``adapter-*`` folders are removed."""
    kept = staging / f"adapter-{version}"
    kept.mkdir(exist_ok=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        try:
            os.link(Path(folder, name).resolve(), kept / name)
        except OSError:
            shutil.copyfile(Path(folder, name), kept / name)
    for old in staging.glob("adapter-*"):
        if old != kept:
            shutil.rmtree(old, ignore_errors=True)
    return kept


class AdapterUpdates:
    """Adapter updates for :class:`~.weights.WeightManager`, which provides the rest."""

    engine: Engine
    config: ServerConfig
    adapter: LoraAdapterInfo | None
    source: str
    loaded_at: str
    _lora: ServedLora | None
    _base_files: list[Path]
    _staging: Path

    if TYPE_CHECKING:

        def _loader(self) -> Any: ...
        def _expected(self) -> ModelManifest: ...
        def _check_version(self, version: int | None) -> None: ...
        async def _run_load(self, call: Callable[[], Awaitable[Any]], param: str) -> int: ...
        async def _load(
            self,
            load: Any,
            files: list[Path],
            param: str,
            version: int | None,
            recompute: bool = False,
        ) -> int: ...
        async def _gated(
            self,
            swap: Callable[[int | None, bool], Awaitable[int]],
            done: Callable[[int], None],
            source: str,
            on_inflight: str | None,
            drain_timeout_s: float | None,
            version: int | None,
            verify: bool | None,
            files: list[Path] | None = None,
        ) -> WeightsUpdateResponse: ...

    @property
    def _runtime_lora(self) -> bool:
        return bool(getattr(self.engine, "runtime_lora", False))

    async def _apply_adapter(
        self,
        folder: Path,
        source: str,
        param: str,
        on_inflight: str | None,
        drain_timeout_s: float | None,
        version: int | None = None,
        verify: bool | None = None,
    ) -> WeightsUpdateResponse:
        """Check a PEFT LoRA folder (``adapter.py``), then serve base + adapter inside the
        gate (the module docstring). ``verify`` is for checkpoints (422)."""
        load = self._loader()
        self._check_version(version)
        if verify:
            raise validation_error(
                "verify",
                "the check after the load is for checkpoints; an adapter update is not "
                "checked (send verify: false, or push the merged checkpoint)",
            )
        try:
            adapter = await asyncio.to_thread(
                check_adapter, folder, self._expected(), self.config.max_lora_rank
            )
            lora = await asyncio.to_thread(adapter.load)
        except CheckpointError as exc:
            raise validation_error(param, str(exc)) from None
        info = LoraAdapterInfo(
            source=source,
            rank=adapter.rank,
            lora_alpha=adapter.alpha,
            scale=adapter.scale,
            target_modules=adapter.target_modules,
            num_tensors=len(lora),
            served_as="runtime" if self._runtime_lora else "merged",
        )

        async def swap(v: int | None, recompute: bool) -> int:
            return await self._load_adapter(lora, adapter.scale, folder, param, v, recompute, load)

        def done(v: int) -> None:
            kept = keep_adapter(folder, self._staging, v)
            self.adapter, self._lora = info, (lora, adapter.scale, kept)
            self.source = source
            self.loaded_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")

        return await self._gated(swap, done, source, on_inflight, drain_timeout_s, version, False)

    async def _load_adapter(
        self,
        lora: LoraWeights,
        scale: float,
        folder: Path,
        param: str,
        version: int | None,
        recompute: bool,
        load: Any,
    ) -> int:
        """base + the adapter (``lora`` read from ``folder``) served as ``version``: the
        engine's runtime LoRA, or its own ``load_adapter``, else a merged full checkpoint
        through ``load_weights``."""
        engine: Any = self.engine
        if self._runtime_lora:
            return await self._run_load(
                lambda: engine.load_adapter_dir(folder, version=version, recompute=recompute),
                param,
            )
        direct = getattr(engine, "load_adapter", None)
        if direct is not None:
            return await self._run_load(
                lambda: direct(lora, scale, self._base_files, version=version, recompute=recompute),
                param,
            )
        merged = await asyncio.to_thread(
            merged_checkpoint, self._base_files, lora, scale, self._staging
        )
        try:
            return await self._load(load, [merged], param, version, recompute=recompute)
        finally:
            merged.unlink(missing_ok=True)
