"""The files of a weight update: paths under ``--weights-root`` and kept links.

A path is resolved with symlinks followed and must stay inside the root (403 naming
``path`` otherwise); a directory's ``.safetensors`` files are re-checked one by one
(a link inside may leave the root). The served checkpoint's files are kept as hard
links, so a failed ``verify`` can restore them after an upload's file is gone.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import ServiceError, validation_error
from .adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS

__all__ = ["inside_root", "keep_links", "resolve_under_root", "weight_files"]


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


def inside_root(folder: Path, root: Path) -> None:
    """An adapter folder's files must not link outside the root (403 naming ``path``)."""
    for f in (folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS):
        if f.exists() and not f.resolve().is_relative_to(root.resolve()):
            raise ServiceError(
                403, "permission_error", f"path: {f.name!r} links outside the weights root", "path"
            )


# --- the manager -----------------------------------------------------------------------


def keep_links(files: list[Path], staging: Path, version: int) -> list[Path]:
    """Hard links (copies across file systems) to ``files`` in ``staging/served-<version>``;
    older ``served-*`` folders are removed. Returns the links."""
    folder = staging / f"served-{version}"
    folder.mkdir(exist_ok=True)
    kept = []
    for i, f in enumerate(files):
        dst = folder / f"{i:05d}.safetensors"
        try:
            os.link(Path(f).resolve(), dst)
        except OSError:  # another file system: a copy
            shutil.copyfile(f, dst)
        kept.append(dst)
    for old in staging.glob("served-*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    return kept
