"""Policy weight updates: ``POST /v1/weights``, ``POST /v1/weights/upload``, ``GET /v1/weights``.

An update: find the files under ``--weights-root`` (``weight_files.py``: 403 outside
it) or stage the upload; check them completely before any engine sees them
(``checkpoint.py``, or ``adapter.py`` for a LoRA adapter: 422 naming ``path`` /
``body``); swap them in (``drain`` / ``abort``: inside the closed admission gate;
``keep`` / ``recompute``: with rollouts in flight); with ``verify``, check the engine
against the file (``verify.py``) and restore the previous weights on a disagreement.
The whole sequence, its errors and guarantees: docs/weights.md.
Engines without ``load_weights`` answer 501.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dvp_schemas import (
    LoraAdapterInfo,
    WeightsInfo,
    WeightsUpdateRequest,
    WeightsUpdateResponse,
    WeightsVerifyReport,
)

from ..config import ServerConfig
from ..engines.base import Engine, EngineError, WeightLoader
from ..errors import ServiceError, validation_error
from .adapter import is_adapter_dir, unpack_adapter
from .adapter_updates import AdapterUpdates, ServedLora
from .admission import Admission
from .checkpoint import CheckpointError, ModelManifest, check_checkpoint
from .verify import ReferenceWorker, VerifyMismatch, default_atol, verify_engine
from .weight_files import inside_root, keep_links, resolve_under_root, weight_files

__all__ = ["WeightManager", "resolve_under_root", "weight_files"]

logger = logging.getLogger(__name__)

#: Policies under which in-flight rollouts continue across the swap.
IN_FLIGHT = ("keep", "recompute")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class WeightManager(AdapterUpdates):
    """Checks, stages and applies weight updates for one engine.

    Args:
        engine: the real (started) engine; updates need its ``load_weights``.
        admission: the admission gate every rollout passes.
        config: ``weights_root``, the default policy and drain timeout.
    """

    def __init__(self, engine: Engine, admission: Admission, config: ServerConfig) -> None:
        self.engine = engine
        self.admission = admission
        self.config = config
        self.source = f"model:{engine.info.model_id}"
        self.loaded_at = _now()
        self._manifest: ModelManifest | None = None
        model_dir = getattr(engine, "model_dir", None)
        try:
            self._manifest = ModelManifest.from_model_dir(Path(model_dir)) if model_dir else None
        except (OSError, CheckpointError) as exc:
            logger.warning("weight updates disabled: %s", exc)
        self.num_tensors = len(self._manifest.tensors) if self._manifest else 0
        self._staging = Path(tempfile.mkdtemp(prefix="dvp-weights-"))
        self._reference = ReferenceWorker()  # verify's process, started on first use
        self._model_dir = Path(model_dir) if model_dir else None
        # the served checkpoint's files, to restore after a failed verify: the model's
        # own at start, then links to each loaded checkpoint (an upload is deleted)
        self._current: list[Path] = (
            sorted(self._model_dir.glob("*.safetensors")) if self._model_dir else []
        )
        # the base checkpoint an adapter is served on (its files, its source), and the
        # adapter served now (None: the checkpoint alone)
        self._base_files, self._base_source = list(self._current), self.source
        self.adapter: LoraAdapterInfo | None = None
        self._lora: ServedLora | None = None

    def close(self) -> None:
        """Remove the staging directory of uploads; stop verify's process."""
        shutil.rmtree(self._staging, ignore_errors=True)
        self._reference.close()

    def info(self) -> WeightsInfo:
        return WeightsInfo(
            policy_version=self.engine.policy_version,
            source=self.source,
            loaded_at=self.loaded_at,
            num_tensors=self.num_tensors,
            on_inflight=self.config.weights_update_policy,  # type: ignore[arg-type]
            base_source=self._base_source if self.adapter else None,
            adapter=self.adapter,
        )

    def _expected(self) -> ModelManifest:
        if self._manifest is None:
            raise ServiceError(
                501,
                "not_implemented_error",
                "weights: the served model has no safetensors checkpoint to check updates against",
            )
        return self._manifest

    def _loader(self) -> Any:
        if not isinstance(self.engine, WeightLoader):
            raise ServiceError(
                501,
                "not_implemented_error",
                f"weights: the {self.engine.info.name} engine cannot load new weights",
            )
        return self.engine.load_weights

    async def update_from_path(self, request: WeightsUpdateRequest) -> WeightsUpdateResponse:
        """``POST /v1/weights``: load the files at ``request.path`` (see the module docstring)."""
        root = self.config.weights_root
        target = await asyncio.to_thread(resolve_under_root, root, request.path)
        assert root is not None  # resolve_under_root refuses a missing root
        rel = target.relative_to(root.resolve())
        if await asyncio.to_thread(is_adapter_dir, target):
            await asyncio.to_thread(inside_root, target, root)
            return await self._apply_adapter(
                target,
                f"path:{rel}",
                "path",
                request.on_inflight,
                request.drain_timeout_s,
                version=request.policy_version,
                verify=request.verify,
            )
        files = await asyncio.to_thread(weight_files, target, root)
        return await self._apply(
            files,
            f"path:{rel}",
            "path",
            request.on_inflight,
            request.drain_timeout_s,
            version=request.policy_version,
            verify=request.verify,
        )

    async def update_from_bytes(
        self,
        body: bytes,
        on_inflight: str | None,
        drain_timeout_s: float | None,
        verify: bool | None = None,
        kind: str = "checkpoint",
    ) -> WeightsUpdateResponse:
        """``POST /v1/weights/upload``: the body is one safetensors file, or with ``kind``
        ``"adapter"`` a tar of a PEFT adapter folder (``adapter.unpack_adapter``)."""
        digest = hashlib.sha256(body).hexdigest()
        if kind == "adapter":
            folder = Path(tempfile.mkdtemp(prefix="adapter-", dir=self._staging))
            try:
                try:
                    await asyncio.to_thread(unpack_adapter, body, folder)
                except CheckpointError as exc:
                    raise validation_error("body", str(exc)) from None
                return await self._apply_adapter(
                    folder, f"upload:sha256:{digest}", "body", on_inflight, drain_timeout_s,
                    verify=verify,
                )  # fmt: skip
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        fd, name = tempfile.mkstemp(suffix=".safetensors", dir=self._staging)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                await asyncio.to_thread(f.write, body)
            return await self._apply(
                [path],
                f"upload:sha256:{digest}",
                "body",
                on_inflight,
                drain_timeout_s,
                names=["upload"],
                verify=verify,
            )
        finally:
            path.unlink(missing_ok=True)

    async def _apply(
        self,
        files: list[Path],
        source: str,
        param: str,
        on_inflight: str | None,
        drain_timeout_s: float | None,
        version: int | None = None,
        names: list[str] | None = None,
        verify: bool | None = None,
    ) -> WeightsUpdateResponse:
        """Check, then swap inside the closed gate; ``version``: the new policy_version
        (above the served one; None: the served one plus one); ``names``: the files'
        names in messages (default their own); ``verify``: check the engine after the
        load (None: the server's default)."""
        load = self._loader()
        self._check_version(version)
        try:
            count = await asyncio.to_thread(check_checkpoint, files, self._expected(), names)
        except CheckpointError as exc:
            raise validation_error(param, str(exc)) from None

        async def swap(v: int | None, recompute: bool) -> int:
            return await self._load(load, files, param, v, recompute=recompute)

        def done(v: int) -> None:
            self._keep(files, v)
            self._base_files, self._base_source = self._current, source
            self.adapter, self._lora = None, None
            self.source, self.loaded_at, self.num_tensors = source, _now(), count

        return await self._gated(
            swap, done, source, on_inflight, drain_timeout_s, version, verify, files
        )

    def _check_version(self, version: int | None) -> None:
        if version is not None and version <= self.engine.policy_version:
            raise validation_error(
                "policy_version",
                f"must be above the served policy_version {self.engine.policy_version}, "
                f"got {version}",
            )

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
    ) -> WeightsUpdateResponse:
        """``swap`` inside the closed gate (or with rollouts in flight), then ``done``;
        ``verify`` (None: the server's default) checks the engine against ``files``."""
        policy = on_inflight or self.config.weights_update_policy
        previous = self.engine.policy_version
        reason = None
        if policy == "abort":
            reason = (
                f"aborted by a weight update (policy_version {previous} -> {previous + 1}, "
                "on_inflight='abort'); retry to sample with the new weights"
            )
        timeout = drain_timeout_s or self.config.weights_drain_timeout_s
        check = files is not None and (self.config.weights_verify if verify is None else verify)
        if policy in IN_FLIGHT:
            if check:
                raise validation_error(
                    "verify",
                    f"a checked update needs on_inflight 'drain' or 'abort' (with "
                    f"{policy!r} rollouts would sample from the weights before the check "
                    "passed); send verify: false or another on_inflight",
                )
            async with self.admission.in_flight_update() as report:
                t0 = time.perf_counter()
                version = await swap(version, policy == "recompute")
                load_s = time.perf_counter() - t0
                checked = None
                done(version)
        else:
            async with self.admission.exclusive(
                abort_reason=reason, abort=self.engine.abort, timeout_s=timeout
            ) as report:
                t0 = time.perf_counter()
                version = await swap(version, False)
                load_s = time.perf_counter() - t0
                checked = None
                if check:
                    assert files is not None
                    checked = await self._verify(self._loader(), files, previous)
                done(version)
        logger.info(
            "weights: policy_version %d -> %d from %s (%s: %d drained, %d aborted; held %.2f s, "
            "swap %.2f s)",
            previous, version, source, policy, report.drained, report.aborted,
            report.wait_s + load_s, load_s,
        )  # fmt: skip
        return WeightsUpdateResponse(
            **self.info().model_dump(),
            previous_version=previous,
            aborted_rollouts=report.aborted,
            drained_rollouts=report.drained,
            kept_rollouts=report.kept,
            wait_s=report.wait_s,
            load_s=load_s,
            verify=checked,
        )

    def _keep(self, files: list[Path], version: int) -> None:
        """Links to the served checkpoint's files, for :meth:`_verify`'s restore."""
        self._current = keep_links(files, self._staging, version)

    async def _verify(self, load: Any, files: list[Path], previous: int) -> WeightsVerifyReport:
        """The engine against a reference forward of ``files`` (``verify.py``); on a
        disagreement the previous weights are loaded again as ``previous``.

        Raises:
            ServiceError: 422 (``verify``) on a disagreement, the previous weights
                restored; 500 when the check could not run (the new weights serve).
        """
        assert self._model_dir is not None  # a manifest exists, so a model_dir does
        info = self.engine.info
        atol = self.config.weights_verify_atol or default_atol(
            info.dtype, info.capabilities.quantization is not None
        )
        try:
            return await verify_engine(self.engine, self._model_dir, files, atol, self._reference)
        except VerifyMismatch as exc:
            logger.error("weights: verify failed, restoring policy_version %d: %s", previous, exc)
            await self._load(load, self._current, "verify", previous)
            if self._lora is not None:  # the adapter served before, on that checkpoint
                await self._load_adapter(*self._lora, "verify", previous, False, load)
            raise validation_error(
                "verify",
                f"{exc}; the previous weights were loaded again: policy_version {previous} serves",
            ) from None
        except (RuntimeError, ValueError) as exc:
            raise ServiceError(
                500, "weights_verify_error", f"verify: the check could not run: {exc}", "verify"
            ) from None

    async def _load(
        self,
        load: Any,
        files: list[Path],
        param: str,
        version: int | None,
        recompute: bool = False,
    ) -> int:
        """``engine.load_weights(files)``; a failure says what still serves.

        Raises:
            ServiceError: 422 (``param``) when the engine refused the files and kept
                or restored the previous weights; 500 when it could not restore them.
        """
        extra: dict[str, Any] = {"recompute": True} if recompute else {}
        return await self._run_load(lambda: load(files, version=version, **extra), param)

    async def _run_load(self, call: Callable[[], Awaitable[Any]], param: str) -> int:
        """Await the engine's load; a failure says what still serves (see :meth:`_load`)."""
        previous, name = self.engine.policy_version, self.engine.info.name
        try:
            return int(await call())
        except ValueError as exc:
            logger.warning("weights: the %s engine failed the load: %s", name, exc)
            raise validation_error(
                param,
                f"the {name} engine could not load this checkpoint ({exc}); nothing "
                f"changed: policy_version {previous} keeps serving",
            ) from None
        except EngineError as exc:
            logger.error("weights: the %s engine failed the load: %s", name, exc)
            message = (
                f"{param}: the {name} engine failed to load this checkpoint and could not "
                f"restore the previous weights ({exc}); it restarts with policy_version "
                f"{previous}; do not resend this checkpoint unchanged"
            )
            raise ServiceError(500, "weights_load_error", message, param) from None
