"""Policy weight updates: ``POST /v1/weights``, ``POST /v1/weights/upload``, ``GET /v1/weights``.

An update, in order:

1. find the files: a ``.safetensors`` file or a directory of them under
   ``--weights-root`` (:func:`resolve_under_root`: the path is resolved with
   symlinks followed and must stay inside the root, else 403 naming ``path``), or
   the uploaded bytes, saved to a private staging file;
2. check them completely, off the event loop, before any engine sees them
   (:func:`.checkpoint.check_checkpoint`: each header's structure and byte
   ranges, every tensor's name, shape and dtype against the served model's
   :class:`.checkpoint.ModelManifest`, no tensor missing, every value finite);
   422 naming ``path`` (or ``body``) with the first problem. Nothing has been
   held or changed yet, and rollouts keep running meanwhile;
3. close the admission gate (:meth:`Admission.exclusive`): new rollouts wait;
   in-flight ones drain, or are aborted (``on_inflight="abort"``), with a
   timeout (409, nothing changed);
4. ``engine.load_weights(files)`` swaps them between two engine steps and
   returns the new ``policy_version``; with ``verify`` (or ``--weights-verify``) the
   engine's log-probs are then checked against a reference forward of the file
   (``verify.py``) while the gate is still closed, and a disagreement reloads the
   previous weights (kept as links, ``policy_version`` back to the previous one) and
   answers 422 naming ``verify``; the gate reopens. If the engine fails
   the load anyway (the file changed after the check, an I/O error), it keeps
   or restores the previous weights and raises ``ValueError``: 422 naming
   ``path`` / ``body``, ``policy_version`` unchanged. An engine that could not
   restore them raises :class:`~.engines.base.EngineError`: 500
   ``weights_load_error`` (the supervisor restarts it with the previous weights).

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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dvp_schemas import (
    WeightsInfo,
    WeightsUpdateRequest,
    WeightsUpdateResponse,
    WeightsVerifyReport,
)

from ..config import ServerConfig
from ..engines.base import Engine, EngineError, WeightLoader
from ..errors import ServiceError, validation_error
from .admission import Admission
from .checkpoint import CheckpointError, ModelManifest, check_checkpoint
from .verify import ReferenceWorker, VerifyMismatch, default_atol, verify_engine

__all__ = ["WeightManager", "resolve_under_root", "weight_files"]

logger = logging.getLogger(__name__)

#: Policies under which in-flight rollouts continue across the swap.
IN_FLIGHT = ("keep", "recompute")


# --- files ---------------------------------------------------------------------------


def resolve_under_root(root: Path | None, path: str) -> Path:
    """The real path of ``path`` (relative to ``root``, or absolute inside it).

    Symlinks are resolved before the check, so neither ``..`` nor a link can leave
    the root; existence is checked only after containment (no probing outside).

    Raises:
        ServiceError: 403 (``path``) when no root is configured or the path leaves
            it; 422 (``path``) when it does not exist.
    """
    if root is None:
        raise ServiceError(
            403,
            "permission_error",
            "path: loading weights from a path is disabled on this server (start it with "
            "--weights-root)",
            "path",
        )
    base = root.resolve()
    try:
        target = (base / path).resolve()  # an absolute `path` replaces base; then checked
        if not target.is_relative_to(base):
            raise ServiceError(
                403, "permission_error", f"path: {path[:200]!r} is outside the weights root", "path"
            )
        exists = target.exists()
    except (OSError, ValueError) as exc:  # name too long, NUL byte, a link loop
        raise validation_error("path", f"not a usable path: {exc}") from None
    if not exists:
        raise validation_error("path", f"{path[:200]!r} does not exist under the weights root")
    return target


def weight_files(target: Path, root: Path) -> list[Path]:
    """The ``.safetensors`` files of a file or directory (not recursive), each re-checked
    against the root (a directory may hold links that leave it).

    Raises:
        ServiceError: 403 for a file outside the root, 422 when there is no file.
    """
    if target.is_dir():
        files = sorted(p for p in target.iterdir() if p.name.endswith(".safetensors"))
    else:
        files = [target]
    if not files:
        raise validation_error("path", "the directory holds no .safetensors file")
    real = []
    for f in files:
        r = f.resolve()
        if not r.is_relative_to(root.resolve()):
            raise ServiceError(
                403, "permission_error", f"path: {f.name!r} links outside the weights root", "path"
            )
        if not r.is_file() or not r.name.endswith(".safetensors"):
            raise validation_error("path", f"{f.name!r} is not a .safetensors file")
        real.append(r)
    return real


# --- the manager -----------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class WeightManager:
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
        files = await asyncio.to_thread(weight_files, target, root)
        rel = target.relative_to(root.resolve())
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
    ) -> WeightsUpdateResponse:
        """``POST /v1/weights/upload``: the body is one safetensors file."""
        digest = hashlib.sha256(body).hexdigest()
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
        if version is not None and version <= self.engine.policy_version:
            raise validation_error(
                "policy_version",
                f"must be above the served policy_version {self.engine.policy_version}, "
                f"got {version}",
            )
        try:
            count = await asyncio.to_thread(check_checkpoint, files, self._expected(), names)
        except CheckpointError as exc:
            raise validation_error(param, str(exc)) from None
        policy = on_inflight or self.config.weights_update_policy
        previous = self.engine.policy_version
        reason = None
        if policy == "abort":
            reason = (
                f"aborted by a weight update (policy_version {previous} -> {previous + 1}, "
                "on_inflight='abort'); retry to sample with the new weights"
            )
        timeout = drain_timeout_s or self.config.weights_drain_timeout_s
        check = self.config.weights_verify if verify is None else verify
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
                version = await self._load(
                    load, files, param, version, recompute=policy == "recompute"
                )
                load_s = time.perf_counter() - t0
                checked = None
                self._keep(files, version)
                self.source, self.loaded_at, self.num_tensors = source, _now(), count
        else:
            async with self.admission.exclusive(
                abort_reason=reason, abort=self.engine.abort, timeout_s=timeout
            ) as report:
                t0 = time.perf_counter()
                version = await self._load(load, files, param, version)
                load_s = time.perf_counter() - t0
                checked = await self._verify(load, files, previous) if check else None
                self._keep(files, version)
                self.source, self.loaded_at, self.num_tensors = source, _now(), count
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
        folder = self._staging / f"served-{version}"
        folder.mkdir(exist_ok=True)
        kept = []
        for i, f in enumerate(files):
            dst = folder / f"{i:05d}.safetensors"
            try:
                os.link(Path(f).resolve(), dst)
            except OSError:  # another file system: a copy
                shutil.copyfile(f, dst)
            kept.append(dst)
        for old in self._staging.glob("served-*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
        self._current = kept

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
        previous, name = self.engine.policy_version, self.engine.info.name
        try:
            if recompute:
                return int(await load(files, version=version, recompute=True))
            return int(await (load(files) if version is None else load(files, version=version)))
        except ValueError as exc:
            logger.warning("weights: the %s engine failed the load: %s", name, exc)
            raise validation_error(
                param,
                f"the {name} engine could not load this checkpoint ({exc}); nothing "
                f"changed: policy_version {previous} keeps serving",
            ) from None
        except EngineError as exc:
            logger.error("weights: the %s engine failed the load: %s", name, exc)
            raise ServiceError(
                500,
                "weights_load_error",
                f"{param}: the {name} engine failed to load this checkpoint and could not "
                f"restore the previous weights ({exc}); it restarts with policy_version "
                f"{previous}; do not resend this checkpoint unchanged",
                param,
            ) from None
