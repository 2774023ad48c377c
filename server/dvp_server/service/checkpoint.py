"""Checkpoint checks: a weight update is read and checked in full before any engine sees it.

A safetensors file is 8 bytes (little-endian u64 ``N``), ``N`` bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data; offsets count from the end of the header. :func:`read_header`
checks the structure as the safetensors library does when it opens a file (the
engines' loaders call it): known dtypes, ``end - begin = prod(shape) * itemsize``,
and the ranges sorted by offset tile the data exactly (no overlap, no gap, the
last one ending at the end of the file: a truncated file is caught here).

:class:`ModelManifest` is the served model's tensors (names, dtypes, shapes),
read once from its directory's safetensors headers. :func:`check_checkpoint`
holds an update against it, in this order, and raises :class:`CheckpointError`
with the first problem:

1. each file's header (above); a name in two files;
2. each tensor is a tensor of the served model (with tied embeddings
   ``lm_head.weight`` is not one: the head is the input embedding), has its
   shape, and a floating dtype when the model's is floating (F16, BF16, F32,
   F64: converted to the served dtype on load), else the model's exact dtype;
3. no tensor of the model is missing: an update is always the whole model (a
   partial update would leave a vLLM layer half-loaded);
4. the data: every value finite (no NaN or inf), read once in 16 MiB blocks.
   This also reads every byte, so an I/O error surfaces here, not half-way
   through an engine's load.

Everything here is blocking file I/O: callers run it off the event loop.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = [
    "CheckpointError",
    "ModelManifest",
    "TensorEntry",
    "check_checkpoint",
    "read_header",
]

#: Bytes per element of each safetensors dtype.
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
_NUMPY_FLOATS = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}  # safetensors is little-endian
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header
_BLOCK_BYTES = 16 << 20  # data read per step of the finiteness scan
_TIED_HEAD = "lm_head.weight"


class CheckpointError(ValueError):
    """A checkpoint that must not reach an engine; the message names the file and tensor."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header.

    Attributes:
        dtype: safetensors dtype name (``"F32"``, ``"BF16"``, ...).
        shape: the tensor's shape.
        begin: first byte of its data, from the start of the file.
        end: one past its last byte, from the start of the file.
    """

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise CheckpointError(f"the header names {k!r} twice")
        out[k] = v
    return out


def _load_json(f: BinaryIO, size: int) -> tuple[dict[str, Any], int]:
    """The header object and where the data starts; checks the header's size."""
    head = f.read(8)
    if len(head) < 8:
        raise CheckpointError("not a safetensors file (shorter than its 8-byte header size)")
    (n,) = struct.unpack("<Q", head)
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise CheckpointError(f"not a safetensors file (header size {n} for a {size}-byte file)")
    try:
        header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"not a safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError("not a safetensors file (header is not a JSON object)")
    return header, 8 + n


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(name: str, raw: Any, data_start: int) -> TensorEntry:
    """One header entry, checked: known dtype, shape, offsets spanning exactly its bytes."""
    if not isinstance(raw, dict) or not {"dtype", "shape", "data_offsets"} <= set(raw):
        raise CheckpointError(f"tensor {name!r}: needs dtype, shape and data_offsets")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise CheckpointError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise CheckpointError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if (
        not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets))
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(
            f"tensor {name!r}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, "
            f"its {dtype} shape {shape} needs {nbytes}"
        )
    return TensorEntry(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _check_coverage(entries: dict[str, TensorEntry], data_start: int, size: int) -> None:
    """The tensors' byte ranges, sorted, tile ``[data_start, size)``: no overlap, no gap."""
    pos, prev = data_start, None
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin < pos:
            raise CheckpointError(f"tensor {name!r} overlaps tensor {prev!r} in the file")
        if e.begin > pos:
            raise CheckpointError(
                f"{e.begin - pos} bytes before tensor {name!r} belong to no tensor"
            )
        if e.end > size:
            raise CheckpointError(
                f"truncated: tensor {name!r} ends at byte {e.end}, the file has {size} bytes"
            )
        pos, prev = e.end, name
    if pos != size:
        raise CheckpointError(f"{size - pos} bytes at the end of the file belong to no tensor")


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file, with its structure checked (no data read).

    Raises:
        CheckpointError: not a well-formed safetensors file (the message says why).
        OSError: the file cannot be read.
    """
    with Path(path).open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, data_start = _load_json(f, size)
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise CheckpointError("__metadata__ must map strings to strings")
    entries = {name: _entry(name, raw, data_start) for name, raw in header.items()}
    _check_coverage(entries, data_start, size)
    return entries


# --- the served model ------------------------------------------------------------------


@dataclass(frozen=True)
class ModelManifest:
    """The served model's tensors: name -> (safetensors dtype, shape).

    Attributes:
        tensors: every tensor a full update must carry.
        tied_head: the model ties ``lm_head.weight`` to its input embedding.
    """

    tensors: dict[str, tuple[str, tuple[int, ...]]]
    tied_head: bool = False

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> ModelManifest:
        """Read once from ``model_dir/*.safetensors`` (headers only) and ``config.json``.

        Raises:
            CheckpointError: no safetensors file, or a malformed one.
        """
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{model_dir} holds no .safetensors file")
        tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
        for f in files:
            tensors.update({k: (e.dtype, e.shape) for k, e in read_header(f).items()})
        tied = _tied_embeddings(Path(model_dir))
        if tied:
            tensors.pop(_TIED_HEAD, None)
        return cls(tensors, tied)


def _tied_embeddings(model_dir: Path) -> bool:
    """``tie_word_embeddings`` from the model's config (transformers' default: True)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("tie_word_embeddings", True))


def _check_tensor(manifest: ModelManifest, name: str, e: TensorEntry) -> None:
    if name not in manifest.tensors:
        hint = ""
        if name == _TIED_HEAD and manifest.tied_head:
            hint = " (the model ties it to the input embedding: leave it out)"
        raise CheckpointError(f"tensor {name!r} is not a tensor of the served model{hint}")
    dtype, shape = manifest.tensors[name]
    if e.shape != shape:
        raise CheckpointError(
            f"tensor {name!r} has shape {list(e.shape)}, the model's is {list(shape)}"
        )
    if dtype in FLOAT_DTYPES and e.dtype not in FLOAT_DTYPES:
        raise CheckpointError(
            f"tensor {name!r} has dtype {e.dtype}, not one of {', '.join(sorted(FLOAT_DTYPES))}"
        )
    if dtype not in FLOAT_DTYPES and e.dtype != dtype:
        raise CheckpointError(f"tensor {name!r} has dtype {e.dtype}, the model's is {dtype}")


def _blocks(f: BinaryIO, name: str, e: TensorEntry) -> Iterator[bytes]:
    """The tensor's bytes in blocks of whole elements (at most :data:`_BLOCK_BYTES`)."""
    f.seek(e.begin)
    left = e.end - e.begin
    while left:
        block = f.read(min(left, _BLOCK_BYTES))
        if not block:
            raise CheckpointError(f"the file ends inside tensor {name!r} (byte {e.end - left})")
        left -= len(block)
        yield block


def _all_finite(block: bytes, dtype: str) -> bool:
    """Whether every value of a block of ``dtype`` (F16, BF16, F32, F64) is finite.

    numpy's ``isfinite`` for its own float types; bf16 has none, and a bf16 value
    is not finite when its 8 exponent bits are all ones: ``bits & 0x7F80 == 0x7F80``.
    """
    if dtype == "BF16":
        bits = np.frombuffer(block, dtype="<u2")
        return not bool((np.bitwise_and(bits, 0x7F80) == 0x7F80).any())
    return bool(np.isfinite(np.frombuffer(block, dtype=_NUMPY_FLOATS[dtype])).all())


def first_non_finite(path: Path, entries: dict[str, TensorEntry]) -> str | None:
    """The first float tensor (in file order) holding a NaN or an infinity, else None."""
    with Path(path).open("rb", buffering=0) as f:
        for name, e in sorted(entries.items(), key=lambda kv: kv[1].begin):
            if e.dtype not in FLOAT_DTYPES:
                continue
            if not all(_all_finite(block, e.dtype) for block in _blocks(f, name, e)):
                return name
    return None


def check_checkpoint(
    files: Sequence[Path], manifest: ModelManifest, names: Sequence[str] | None = None
) -> int:
    """Check a full update (one or more files) against the served model (module docstring).

    Args:
        files: the update's safetensors files.
        manifest: the served model's tensors.
        names: what to call each file in messages; default the file names.

    Returns:
        The number of tensors.

    Raises:
        CheckpointError: the first problem, prefixed with the file's name.
    """
    labelled = list(zip(files, names or [f.name for f in files], strict=True))
    headers: list[dict[str, TensorEntry]] = []
    seen: dict[str, str] = {}
    for path, label in labelled:
        try:
            entries = read_header(path)
            for name, e in entries.items():
                if name in seen:
                    raise CheckpointError(f"tensor {name!r} is also in {seen[name]}")
                _check_tensor(manifest, name, e)
                seen[name] = label
        except (CheckpointError, OSError) as exc:
            raise CheckpointError(f"{label}: {exc}") from None
        headers.append(entries)
    missing = sorted(set(manifest.tensors) - set(seen))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]!r} is missing{more}; updates are whole models")
    for (path, label), entries in zip(labelled, headers, strict=True):
        try:
            bad = first_non_finite(path, entries)
        except (CheckpointError, OSError) as exc:
            raise CheckpointError(f"{label}: cannot read the data: {exc}") from None
        if bad is not None:
            raise CheckpointError(f"{label}: tensor {bad!r} holds NaN or infinite values")
    return len(seen)
