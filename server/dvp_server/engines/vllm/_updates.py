"""Weight and adapter updates of the vLLM engine (mixed into :class:`~.engine.VllmEngine`).

A checkpoint is reloaded in place by vLLM's workers (``_worker.py``, ``_reload.py``);
with ``--enable-lora`` an adapter replaces the policy slot's weights in place
(``_lora.py``). Both pause vLLM's scheduler between two steps with its requests kept,
stamp later steps with the new version, reset the prefix cache and resume; requests
are salted with their admission version, so none reads an older version's prefix
blocks (docs/async.md).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base import EngineError, PolicyVersion
from ._lora import link_adapter, policy_lora_request
from ._reload import link_weights, load_lora, reload_weights

if TYPE_CHECKING:
    from ._args import VllmSettings

__all__ = ["WeightUpdates"]

logger = logging.getLogger(__name__)


class WeightUpdates:
    """Updates for :class:`~.engine.VllmEngine`, which provides the state below."""

    settings: VllmSettings
    model_dir: Path
    _state: str
    _version: PolicyVersion
    _weights_dir: Path | None
    _recomputes: list[int]
    _lora_dir: Path | None
    _zero_lora: Path | None

    if TYPE_CHECKING:

        def _running(self) -> Any: ...

    async def load_weights(
        self, weights: Sequence[Path], version: int | None = None, recompute: bool = False
    ) -> int:
        """Reload the model's weights in place from safetensors files; the new version.

        vLLM's scheduler pauses between two steps with its requests kept; its workers
        reload from a folder of links to the files and stamp later steps with the new
        version (``_worker.py``); the prefix cache is reset; generation resumes. With
        ``recompute`` vLLM first preempts every running request, which it then
        prefills again under the new weights. Requests are salted with their admission
        version, so none reads an older version's prefix blocks (docs/async.md).

        If vLLM fails the reload (its layers may then be half-loaded), the previous
        weights are reloaded at once (:meth:`_restore_weights`).

        Args:
            weights: the checked ``.safetensors`` files.
            version: the ``policy_version`` to serve them as (a fleet's number); None:
                the current one plus one.

        Raises:
            ValueError: vLLM failed the reload and the previous weights serve again.
            EngineError: the engine is not running, or the previous weights could not
                be restored either (the engine is then marked dead and restarted).
        """
        llm = self._running()
        folder = link_weights(weights)
        new = self._version.value + 1 if version is None else version
        await llm.pause_generation(mode="keep", clear_cache=False)
        try:  # a checkpoint is the new base: the zero adapter in the LoRA slot
            await reload_weights(llm, folder, new, recompute=recompute, lora=self._zero_lora)
        except BaseException as exc:
            shutil.rmtree(folder, ignore_errors=True)
            if isinstance(exc, EngineError):
                await self._restore_weights(llm, exc)
            raise
        finally:
            with contextlib.suppress(Exception):
                await llm.resume_generation()
        if recompute:
            self._recomputes.append(new)
        self._set_lora(self._zero_lora)
        old, self._weights_dir = self._weights_dir, folder
        weakref.finalize(self, shutil.rmtree, folder, True)  # at the latest at exit
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self._version.advance(version)

    @property
    def runtime_lora(self) -> bool:
        """Adapters are served by vLLM's runtime LoRA (``--enable-lora``, ``_lora.py``)."""
        return self.settings.enable_lora

    async def load_adapter_dir(
        self, folder: Path, version: int | None = None, recompute: bool = False
    ) -> int:
        """Serve base + the PEFT adapter in ``folder`` (checked by the server) as the new
        version: the policy slot's weights replaced in place between two steps, in the
        same worker call that stamps the version; the prefix cache reset. Rollouts in
        flight go on with it from their next step (``recompute``: prefilled again first).

        Raises:
            ValueError: runtime LoRA is off, or vLLM refused the adapter (the previous
                one still serves, at the same version).
            EngineError: the engine is not running.
        """
        if not self.runtime_lora:
            raise ValueError("runtime LoRA is off (start the server with --enable-lora)")
        llm = self._running()
        kept = link_adapter(folder)
        new = self._version.value + 1 if version is None else version
        await llm.pause_generation(mode="keep", clear_cache=False)
        try:
            await load_lora(llm, kept, new, recompute=recompute)
        except BaseException:
            shutil.rmtree(kept, ignore_errors=True)
            raise
        finally:
            with contextlib.suppress(Exception):
                await llm.resume_generation()
        if recompute:
            self._recomputes.append(new)
        self._set_lora(kept)
        return self._version.advance(version)

    def _set_lora(self, folder: Path | None) -> None:
        """The slot now serves ``folder``; the previous adapter's links are removed."""
        old, self._lora_dir = self._lora_dir, folder
        if folder is not None and folder != self._zero_lora:
            weakref.finalize(self, shutil.rmtree, folder, True)
        if old is not None and old not in (folder, self._zero_lora):
            shutil.rmtree(old, ignore_errors=True)

    def _lora_request(self) -> Any:
        """The policy adapter's ``LoRARequest`` (None with runtime LoRA off)."""
        return policy_lora_request(self._lora_dir) if self._lora_dir is not None else None

    async def _restore_weights(self, llm: Any, failure: EngineError) -> None:
        """Reload the previous weights after a failed reload, which left vLLM's layers
        on the meta device (the next step would kill the ``EngineCore``).

        Twice: a reload that failed mid-way leaves some layers with part of their
        tensors buffered (vLLM's layerwise reload); the first restore can complete
        such a layer early with those stale tensors, but it ends with every layer's
        reload state reset, so the second loads every tensor from a clean state.

        Raises:
            ValueError: restored; the message says why the reload failed.
            EngineError: not restored; the engine is marked dead (the supervisor
                restarts it, with the previous weights).
        """
        previous = self._weights_dir or self.model_dir
        try:
            for _ in range(2):
                await reload_weights(llm, previous, self._version.value, lora=self._lora_dir)
        except EngineError as again:
            self._state = "dead"
            raise EngineError(
                f"{failure}; restoring the previous weights failed: {again}"
            ) from again
        logger.warning("weights reload failed, previous weights restored: %s", failure)
        raise ValueError(f"{failure}; the previous weights were reloaded") from failure
