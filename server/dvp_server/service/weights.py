"""Policy weight updates: ``POST /v1/weights``, ``POST /v1/weights/upload``, ``GET /v1/weights``.

An update, in order:

1. find the files: a ``.safetensors`` file or a directory of them under
   ``--weights-root`` (:func:`resolve_under_root`: the path is resolved with
   symlinks followed and must stay inside the root, else 403 naming ``path``), or
   the uploaded bytes, saved to a private staging file;
2. check them without loading: every file's header against the served
   checkpoint's (:func:`checkpoint_spec`): the same tensor names, the same
   shapes, floating dtypes; 422 naming the first tensor that differs. Nothing
   has been held or changed yet;
3. close the admission gate (:meth:`Admission.exclusive`): new rollouts wait;
   in-flight ones drain, or are aborted (``on_inflight="abort"``), with a
   timeout (409, nothing changed);
4. ``engine.load_weights(files)`` swaps them between two engine steps and
   returns the new ``policy_version``; the gate reopens.

Engines without ``load_weights`` answer 501.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dvp_schemas import ErrorResponse, WeightsInfo, WeightsUpdateRequest, WeightsUpdateResponse
from fastapi import APIRouter, Query, Request

from ..config import ServerConfig
from ..engines.base import Engine
from ..errors import ServiceError, validation_error
from .admission import Admission

__all__ = [
    "WeightManager",
    "checkpoint_spec",
    "read_safetensors_header",
    "resolve_under_root",
    "router",
]

logger = logging.getLogger(__name__)

TensorSpec = dict[str, tuple[str, tuple[int, ...]]]  # name -> (safetensors dtype, shape)
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header


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


def read_safetensors_header(path: Path) -> TensorSpec:
    """Tensor names, dtypes and shapes from a safetensors file's header (no tensor data).

    Format: 8 bytes little-endian u64 ``N``, then ``N`` bytes of JSON
    ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``.

    Raises:
        ValueError: not a safetensors file (the message says what is wrong).
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("not a safetensors file (shorter than its 8-byte header size)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"not a safetensors file (header size {n} for a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (header is not a JSON object)")
    spec: TensorSpec = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            spec[name] = (str(entry["dtype"]), tuple(int(d) for d in entry["shape"]))
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"not a safetensors file (bad entry for {name!r})") from None
    return spec


def _read_all(files: Sequence[Path], param: str) -> TensorSpec:
    """The union of the files' headers; a name in two files is refused."""
    spec: TensorSpec = {}
    for f in files:
        try:
            header = read_safetensors_header(f)
        except (OSError, ValueError) as exc:
            raise validation_error(param, f"{f.name}: {exc}") from None
        for name in header:
            if name in spec:
                raise validation_error(param, f"tensor {name!r} appears in two files")
        spec.update(header)
    return spec


def checkpoint_spec(model_dir: Path) -> TensorSpec:
    """Names, dtypes and shapes of the served checkpoint (``model_dir/*.safetensors``).

    Raises:
        ValueError: the model directory holds no safetensors file.
    """
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} holds no .safetensors file to check updates against")
    spec: TensorSpec = {}
    for f in files:
        spec.update(read_safetensors_header(f))
    return spec


def check_spec(expected: TensorSpec, got: TensorSpec, param: str) -> None:
    """Same names, same shapes, floating dtypes; 422 naming the first tensor that differs."""
    for name, (dtype, shape) in got.items():
        if name not in expected:
            raise validation_error(param, f"tensor {name!r} is not a tensor of the served model")
        want = expected[name][1]
        if shape != want:
            raise validation_error(
                param, f"tensor {name!r} has shape {list(shape)}, the model's is {list(want)}"
            )
        if dtype not in FLOAT_DTYPES:
            raise validation_error(param, f"tensor {name!r} has dtype {dtype}, not a float")
    missing = sorted(set(expected) - set(got))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise validation_error(param, f"tensor {missing[0]!r} is missing{more}")


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
        self._spec: TensorSpec | None = None
        model_dir = getattr(engine, "model_dir", None)
        try:
            self._spec = checkpoint_spec(Path(model_dir)) if model_dir else None
        except (OSError, ValueError) as exc:
            logger.warning("weight updates disabled: %s", exc)
        self.num_tensors = len(self._spec or {})
        self._staging = Path(tempfile.mkdtemp(prefix="dvp-weights-"))

    def close(self) -> None:
        """Remove the staging directory of uploads."""
        shutil.rmtree(self._staging, ignore_errors=True)

    def info(self) -> WeightsInfo:
        return WeightsInfo(
            policy_version=self.engine.policy_version,
            source=self.source,
            loaded_at=self.loaded_at,
            num_tensors=self.num_tensors,
            on_inflight=self.config.weights_update_policy,  # type: ignore[arg-type]
        )

    def _expected(self) -> TensorSpec:
        if self._spec is None:
            raise ServiceError(
                501,
                "not_implemented_error",
                "weights: the served model has no safetensors checkpoint to check updates against",
            )
        return self._spec

    def _loader(self) -> Any:
        load = getattr(self.engine, "load_weights", None)
        if load is None:
            raise ServiceError(
                501,
                "not_implemented_error",
                f"weights: the {self.engine.info.name} engine cannot load new weights",
            )
        return load

    async def update_from_path(self, request: WeightsUpdateRequest) -> WeightsUpdateResponse:
        """``POST /v1/weights``: load the files at ``request.path`` (see the module docstring)."""
        root = self.config.weights_root
        target = await asyncio.to_thread(resolve_under_root, root, request.path)
        assert root is not None  # resolve_under_root refuses a missing root
        files = await asyncio.to_thread(weight_files, target, root)
        rel = target.relative_to(root.resolve())
        return await self._apply(
            files, f"path:{rel}", "path", request.on_inflight, request.drain_timeout_s
        )

    async def update_from_bytes(
        self, body: bytes, on_inflight: str | None, drain_timeout_s: float | None
    ) -> WeightsUpdateResponse:
        """``POST /v1/weights/upload``: the body is one safetensors file."""
        digest = hashlib.sha256(body).hexdigest()
        fd, name = tempfile.mkstemp(suffix=".safetensors", dir=self._staging)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                await asyncio.to_thread(f.write, body)
            return await self._apply(
                [path], f"upload:sha256:{digest}", "body", on_inflight, drain_timeout_s
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
    ) -> WeightsUpdateResponse:
        """Check, then swap inside the closed gate."""
        load = self._loader()
        got = await asyncio.to_thread(_read_all, files, param)
        check_spec(self._expected(), got, param)
        policy = on_inflight or self.config.weights_update_policy
        previous = self.engine.policy_version
        reason = None
        if policy == "abort":
            reason = (
                f"aborted by a weight update (policy_version {previous} -> {previous + 1}, "
                "on_inflight='abort'); retry to sample with the new weights"
            )
        timeout = drain_timeout_s or self.config.weights_drain_timeout_s
        async with self.admission.exclusive(
            abort_reason=reason, abort=self.engine.abort, timeout_s=timeout
        ) as report:
            t0 = time.perf_counter()
            version = int(await load(files))
            load_s = time.perf_counter() - t0
            self.source, self.loaded_at, self.num_tensors = source, _now(), len(got)
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
            wait_s=report.wait_s,
            load_s=load_s,
        )


# --- routes ----------------------------------------------------------------------------

router = APIRouter()
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what}
    for code, what in {
        401: "Missing or wrong API key.",
        403: "The path leaves the weights root, or path loads are disabled.",
        409: "In-flight rollouts did not drain in time; nothing changed.",
        413: "Upload over the body limit.",
        422: "Bad path, file or tensor; the message names it.",
        501: "The engine cannot load weights.",
    }.items()
}


def _manager(request: Request) -> WeightManager:
    return request.app.state.weights  # type: ignore[no-any-return]


@router.get("/v1/weights", response_model=WeightsInfo, responses={401: _ERRORS[401]})
async def get_weights(request: Request) -> WeightsInfo:
    """The served weights: policy_version, source, loaded_at.

    curl -s localhost:8000/v1/weights -H "authorization: Bearer $DVP_API_KEY"
    """
    return _manager(request).info()


@router.post("/v1/weights", response_model=WeightsUpdateResponse, responses=_ERRORS)
async def post_weights(body: WeightsUpdateRequest, request: Request) -> WeightsUpdateResponse:
    """Load weights from a safetensors file or directory under --weights-root.

    curl -s localhost:8000/v1/weights -H 'content-type: application/json' \\
      -d '{"path": "step-100/model.safetensors", "on_inflight": "drain"}'
    """
    return await _manager(request).update_from_path(body)


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post(
    "/v1/weights/upload",
    response_model=WeightsUpdateResponse,
    responses=_ERRORS,
    openapi_extra=_UPLOAD_BODY,
)
async def upload_weights(
    request: Request,
    on_inflight: str | None = Query(None, pattern="^(drain|abort)$"),
    drain_timeout_s: float | None = Query(None, gt=0.0, le=86400.0),
) -> WeightsUpdateResponse:
    """Load weights from the body: one safetensors file (small models; --max-request-bytes).

    curl -s localhost:8000/v1/weights/upload --data-binary @model.safetensors \\
      -H 'content-type: application/octet-stream'
    """
    body = await request.body()
    if not body:
        raise validation_error("body", "the body must be a safetensors file, got 0 bytes")
    return await _manager(request).update_from_bytes(body, on_inflight, drain_timeout_s)
