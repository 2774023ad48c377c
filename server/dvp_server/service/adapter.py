"""LoRA adapters (PEFT format): checked in full before any engine sees them, then merged.

An adapter is a folder with two files, as ``peft``'s ``save_pretrained`` writes them:

- ``adapter_config.json``: ``r`` (the rank), ``lora_alpha``, ``use_rslora``,
  ``target_modules``, and options this server does not serve (refused: ``use_dora``,
  ``bias`` other than ``"none"``, ``modules_to_save``, ``fan_in_fan_out``,
  ``rank_pattern`` / ``alpha_pattern``, a ``peft_type`` other than ``LORA``);
- ``adapter_model.safetensors``: per adapted linear ``<module>.lora_A.weight``
  ``(r, in)`` and ``<module>.lora_B.weight`` ``(out, r)``, the module named as in the
  model with PEFT's ``base_model.model.`` prefix.

Served weights (PEFT's forward, ``peft/tuners/lora/layer.py``, dropout off)::

    W' = W + scale * B @ A,   scale = lora_alpha / r   (lora_alpha / sqrt(r) with use_rslora)

:func:`check_adapter` holds an adapter against the served model's manifest and
raises :class:`~.checkpoint.CheckpointError` with the first problem (the config field
or tensor named): the config above; ``r`` within the server's ``--max-lora-rank``;
every tensor a ``lora_A`` / ``lora_B`` of a 2-D weight of the served model (the
embedding and a tied head excepted), with ``A (r, in)``, ``B (out, r)`` against the
weight's ``(out, in)``, both present, floating; each ``target_modules`` entry names
some adapted module; every value finite. ``engines/lora.merged_weights`` computes
``W'`` (float32) from the base weights (never from weights already merged, so switching
adapters or back to a checkpoint accumulates nothing).

Blocking file I/O: callers run it off the event loop.
"""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import (
    FLOAT_DTYPES,
    CheckpointError,
    ModelManifest,
    TensorEntry,
    first_non_finite,
    read_header,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LoraAdapter",
    "check_adapter",
    "is_adapter_dir",
    "unpack_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$"
)
#: Config options whose non-default values change the forward in ways not served here.
_REFUSED: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None),
    "bias": ("none", None),
    "modules_to_save": (None, []),
    "fan_in_fan_out": (False, None),
    "rank_pattern": (None, {}),
    "alpha_pattern": (None, {}),
}
_MAX_CONFIG_BYTES = 1 << 20


def is_adapter_dir(path: Path) -> bool:
    """Whether ``path`` is a folder holding ``adapter_config.json``."""
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraAdapter:
    """A checked adapter.

    Attributes:
        rank: ``r``.
        alpha: ``lora_alpha``.
        scale: ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        weights: its ``adapter_model.safetensors``.
        keys: served parameter name (``model.layers.0.self_attn.q_proj.weight``) ->
            (the ``lora_A`` tensor's name, the ``lora_B`` tensor's name) in ``weights``.
    """

    rank: int
    alpha: float
    scale: float
    weights: Path
    keys: dict[str, tuple[str, str]]

    @property
    def target_modules(self) -> list[str]:
        """The adapted modules' last names, sorted (``q_proj``, ``v_proj``, ...)."""
        return sorted({name.removesuffix(".weight").rsplit(".", 1)[-1] for name in self.keys})

    def load(self) -> dict[str, tuple[Any, Any]]:
        """Parameter name -> (A ``(r, in)``, B ``(out, r)``) as float32 tensors."""
        from safetensors.torch import load_file

        raw = load_file(str(self.weights))
        return {p: (raw[a].float(), raw[b].float()) for p, (a, b) in self.keys.items()}


def _config(path: Path, max_rank: int) -> tuple[int, float, float, Any]:
    """(r, lora_alpha, scale, target_modules) from ``adapter_config.json``, checked."""
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise CheckpointError(f"{ADAPTER_CONFIG}: larger than {_MAX_CONFIG_BYTES} bytes")
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{ADAPTER_CONFIG}: not readable JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{ADAPTER_CONFIG}: not a JSON object")
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        raise CheckpointError(f"{ADAPTER_CONFIG}: peft_type {kind!r} is not served (only LORA)")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise CheckpointError(f"{ADAPTER_CONFIG}: r must be a positive integer, got {r!r}")
    if r > max_rank:
        raise CheckpointError(
            f"{ADAPTER_CONFIG}: r = {r} is above this server's --max-lora-rank {max_rank}"
        )
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise CheckpointError(f"{ADAPTER_CONFIG}: lora_alpha must be a number, got {alpha!r}")
    for field, allowed in _REFUSED.items():
        if cfg.get(field) not in allowed:
            raise CheckpointError(
                f"{ADAPTER_CONFIG}: {field} = {cfg.get(field)!r} is not served "
                f"(allowed: {' or '.join(repr(a) for a in allowed)})"
            )
    rs = cfg.get("use_rslora", False)
    scale = float(alpha) / (math.sqrt(r) if rs else r)
    return r, float(alpha), scale, cfg.get("target_modules")


def _pairs(entries: dict[str, TensorEntry], manifest: ModelManifest) -> dict[str, tuple[str, str]]:
    """Served parameter -> (A name, B name); every tensor a lora_A / lora_B of a linear."""
    found: dict[str, dict[str, str]] = {}
    for name in entries:
        m = _KEY.match(name)
        if m is None:
            raise CheckpointError(
                f"tensor {name!r} is not a LoRA tensor (<module>.lora_A.weight or "
                "<module>.lora_B.weight)"
            )
        param = m["module"] + ".weight"
        spec = manifest.tensors.get(param)
        if spec is None or len(spec[1]) != 2 or param.endswith("embed_tokens.weight"):
            raise CheckpointError(
                f"tensor {name!r}: target module {m['module']!r} is not a linear of the "
                "served model"
            )
        found.setdefault(param, {})[m["ab"]] = name
    out = {}
    for param, ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            have, need = next(iter(ab)), "B" if "A" in ab else "A"
            raise CheckpointError(f"tensor {ab[have]!r} has no lora_{need} partner")
        out[param] = (ab["A"], ab["B"])
    if not out:
        raise CheckpointError(f"{ADAPTER_WEIGHTS} holds no LoRA tensor")
    return out


def _check_shapes(
    keys: dict[str, tuple[str, str]],
    entries: dict[str, TensorEntry],
    manifest: ModelManifest,
    r: int,
) -> None:
    for param, (a, b) in keys.items():
        out_f, in_f = manifest.tensors[param][1]
        for name, want in ((a, (r, in_f)), (b, (out_f, r))):
            e = entries[name]
            if e.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"tensor {name!r} has dtype {e.dtype}, not a float")
            if e.shape != want:
                raise CheckpointError(
                    f"tensor {name!r} has shape {list(e.shape)}; rank r = {r} and the model's "
                    f"{param} {[out_f, in_f]} need {list(want)}"
                )


def check_adapter(folder: Path, manifest: ModelManifest, max_rank: int) -> LoraAdapter:
    """Check a PEFT LoRA folder against the served model (module docstring).

    Raises:
        CheckpointError: the first problem, naming the file and the field or tensor.
    """
    r, alpha, scale, targets = _config(folder / ADAPTER_CONFIG, max_rank)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{ADAPTER_WEIGHTS} is missing beside {ADAPTER_CONFIG}")
    try:
        entries = read_header(weights)
    except (CheckpointError, OSError) as exc:
        raise CheckpointError(f"{ADAPTER_WEIGHTS}: {exc}") from None
    try:
        keys = _pairs(entries, manifest)
        _check_shapes(keys, entries, manifest, r)
    except CheckpointError as exc:
        raise CheckpointError(f"{ADAPTER_WEIGHTS}: {exc}") from None
    adapted = {p.removesuffix(".weight") for p in keys}
    for t in targets if isinstance(targets, list) else []:
        if not any(m == t or m.endswith("." + str(t)) for m in adapted):
            raise CheckpointError(
                f"{ADAPTER_CONFIG}: target_modules entry {t!r} names no module of the served "
                "model that the adapter holds"
            )
    try:
        bad = first_non_finite(weights, entries)
    except (CheckpointError, OSError) as exc:
        raise CheckpointError(f"{ADAPTER_WEIGHTS}: cannot read the data: {exc}") from None
    if bad is not None:
        raise CheckpointError(f"{ADAPTER_WEIGHTS}: tensor {bad!r} holds NaN or infinite values")
    return LoraAdapter(r, alpha, scale, weights.resolve(), keys)


def unpack_adapter(body: bytes, dest: Path) -> Path:
    """Write an uploaded adapter (a tar, optionally gzipped, holding ``adapter_config.json``
    and ``adapter_model.safetensors`` at its top or in one folder) into ``dest``.

    Only those two regular files are read (no link, no path from the archive is used).

    Raises:
        CheckpointError: not a tar, or one of the two files missing or twice.
    """
    wanted = {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    got: set[str] = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
            for member in tar:
                base = member.name.rstrip("/").rsplit("/", 1)[-1]
                if base not in wanted or not member.isfile():
                    continue
                if base in got:
                    raise CheckpointError(f"the archive holds {base} twice")
                src = tar.extractfile(member)
                assert src is not None  # a regular file
                (dest / base).write_bytes(src.read())
                got.add(base)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CheckpointError(f"not a tar archive of an adapter ({exc})") from None
    missing = sorted(wanted - got)
    if missing:
        raise CheckpointError(f"the archive holds no {missing[0]}")
    return dest
