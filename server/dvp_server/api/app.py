"""The FastAPI app: thin routes over :class:`~dvp_server.service.serving.RolloutService`.

``create_app(config)`` builds the engine in the async lifespan
(:func:`~dvp_server.model_store.resolve_model` +
:func:`~dvp_server.engines.factory.build_engine`), keeps it on
``app.state`` and shuts it down in ``finally``. Every route declares its error
responses (all of them :class:`dvp_schemas.ErrorResponse`, see ``errors.py``);
every response carries ``X-Request-Id`` (the client's, or a fresh one).
OpenAPI: ``/openapi.json``, docs at ``/docs``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from dvp_schemas import (
    HealthResponse,
    ModelCard,
    ModelList,
    RolloutRequest,
    RolloutResponse,
)
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from ..config import ServerConfig
from ..engines.base import Engine
from ..service.serving import RolloutService
from ..service.supervisor import EngineSupervisor
from .bodies import install_body_decoding
from .codecs import model_response
from .disconnect import run_until_disconnect
from .errors import install_error_handlers, responses
from .middleware import middleware_stack
from .openai_routes import router as openai_router
from .ops import Ops
from .ops import router as ops_router
from .score import router as score_router
from .streaming import stream_response
from .weights import router as weights_router

__all__ = ["build_engine", "create_app"]

logger = logging.getLogger(__name__)


router = APIRouter()


@router.post(
    "/v1/rollouts",
    response_model=RolloutResponse,
    responses=responses([404, 422, 429, 499, 500, 503]),
)
async def create_rollouts(body: RolloutRequest, request: Request) -> Response:
    """Sample ``n`` rollouts per prompt with safe-vocabulary (DVP) metadata per token.

    curl -s localhost:8000/v1/rollouts -H 'content-type: application/json' -d '{
      "prompts": ["What is 7*8?", [1, 2, 3], [{"role": "user", "content": "Hi"}]],
      "n": 4, "sampling": {"max_tokens": 64, "seed": 0},
      "pruning": {"min_p": 0.001}, "return_safe_token_ids": true}'
    """
    service: RolloutService = request.app.state.service
    if body.stream:  # NDJSON events (dvp_schemas.stream); 4xx still come before the stream
        return await stream_response(service, body, request)
    work = service.create_rollouts(body, request.state.request_id)
    result = await run_until_disconnect(request, work)
    return model_response(request, result)  # JSON, or msgpack per Accept (codecs.py)


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(request: Request) -> JSONResponse:
    """Liveness and engine state; 200 when serving, 503 otherwise.

    curl -s localhost:8000/health
    """
    engine: Engine = request.app.state.engine
    state = request.app.state.supervisor.state  # the engine's, or 'restarting'
    status = {"running": "ok", "starting": "starting", "restarting": "starting", "dead": "dead"}
    body = HealthResponse(
        status=status.get(state, "degraded"),  # type: ignore[arg-type]
        engine=engine.info.name,
        engine_state=state,
        policy_version=engine.policy_version,
        active_rollouts=getattr(engine, "active_rollouts", None),
    )
    return JSONResponse(body.model_dump(), status_code=200 if body.status == "ok" else 503)


@router.get("/ready", responses={503: {"description": "The engine is not serving (yet)."}})
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 ``{"ready": true, ...}`` while the engine serves, else 503.

    False while the engine starts or restarts after a death, and for good once its
    restarts are exhausted (``supervisor.py``).

    curl -s localhost:8000/ready
    """
    supervisor: EngineSupervisor = request.app.state.supervisor
    body = {"ready": supervisor.ready, "engine_state": supervisor.state}
    headers = {} if supervisor.ready else {"Retry-After": str(supervisor.retry_after_s())}
    return JSONResponse(body, status_code=200 if supervisor.ready else 503, headers=headers)


@router.get("/v1/models", response_model=ModelList, responses=responses([500]))
async def list_models(request: Request) -> ModelList:
    """The served model: id, engine, dtype, vocabulary, context and returned fields.

    curl -s localhost:8000/v1/models
    """
    service: RolloutService = request.app.state.service
    info = service.engine.info
    card = ModelCard(
        id=service.model_id,
        engine=info.name,
        dtype=info.dtype,
        vocab_size=info.vocab_size,
        max_model_len=info.max_model_len,
        policy_version=service.engine.policy_version,
        capabilities=info.capabilities,
        adapter=getattr(getattr(request.app.state, "weights", None), "adapter", None),
    )
    return ModelList(data=[card])


def build_engine(config: ServerConfig) -> tuple[Engine, Any]:
    """Build the configured engine and the model's tokenizer (blocking: loads weights).

    The engine comes from :func:`dvp_server.engines.factory.build_engine`
    (``--engine torch | vllm | auto``); the vLLM engine loads its model in ``start()``.

    Raises:
        ValueError: unknown or unavailable engine, or a model that cannot be found.
    """
    from ..engines.factory import build_engine as build
    from ..model_store import load_tokenizer, resolve_model

    path = resolve_model(config.model, config.cache_dir)
    return build(config, model_dir=path), load_tokenizer(path)


def create_app(
    config: ServerConfig | None = None, engine: Engine | None = None, tokenizer: Any = None
) -> FastAPI:
    """The dvp-serve ASGI app.

    Args:
        config: server configuration (default: :class:`ServerConfig()`).
        engine: an engine to serve instead of building one from ``config``; the
            app starts and shuts it down in its lifespan either way.
        tokenizer: the engine's tokenizer; None: loaded from ``config.model``.
    """
    config = config or ServerConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng, tok = await asyncio.to_thread(_load, config, engine, tokenizer)
        supervisor = EngineSupervisor(  # restarts a dead engine (supervisor.py)
            eng,
            max_restarts=config.engine_restarts,
            backoff_s=config.engine_restart_backoff_s,
            on_attempt=app.state.ops.metrics.on_engine_restart,
        )
        await supervisor.start()
        app.state.supervisor = supervisor
        app.state.config = config
        app.state.engine = eng
        served = app.state.ops.attach(app, eng)  # admission, metrics, weights (ops.py)
        app.state.service = RolloutService(served, tok, config)
        info = eng.info
        logger.info(
            "serving %s with the %s engine (%s, vocab %d, max_model_len %d)",
            info.model_id,
            info.name,
            info.dtype,
            info.vocab_size,
            info.max_model_len,
        )
        try:
            yield
        finally:
            await supervisor.stop()
            await eng.shutdown()
            app.state.ops.detach()

    ops = Ops(config)
    app = FastAPI(
        title="dvp-serve",
        summary="Rollouts with safe-vocabulary (DVP) metadata for LLM reinforcement learning.",
        version=_version(),
        lifespan=lifespan,
        middleware=middleware_stack(config, ops.metrics, ops.lifecycle),  # middleware.py
    )
    app.state.ops = ops
    for routes in (router, score_router, openai_router, weights_router, ops_router):
        app.include_router(routes)
    install_error_handlers(app)  # every exception -> the one error body (errors.py)
    install_body_decoding(app)  # JSON bodies decoded + validated off the loop (bodies.py)
    return app


def _load(config: ServerConfig, engine: Engine | None, tokenizer: Any) -> tuple[Engine, Any]:
    """The given engine / tokenizer, building what is missing (blocking)."""
    if engine is None:
        return build_engine(config)
    if tokenizer is None:
        from ..model_store import load_tokenizer, resolve_model

        tokenizer = load_tokenizer(resolve_model(config.model, config.cache_dir))
    return engine, tokenizer


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dvp-serve")
    except PackageNotFoundError:
        return "0+unknown"
