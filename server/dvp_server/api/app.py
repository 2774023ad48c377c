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
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from dvp_schemas import (
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    RolloutRequest,
    RolloutResponse,
)
from fastapi import APIRouter, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import ServerConfig
from ..engines.base import Engine
from ..errors import error_response, install_error_handlers
from ..service.serving import RolloutService, run_until_disconnect
from ..service.supervisor import EngineGateMiddleware, EngineSupervisor
from .bodies import install_body_decoding
from .codecs import MsgpackBodyMiddleware, model_response
from .openai_routes import router as openai_router
from .ops import install_ops
from .score import router as score_router
from .streaming import stream_response

__all__ = ["BodyLimitMiddleware", "RequestIdMiddleware", "build_engine", "create_app"]

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries: each code answers with the error envelope."""
    described = {
        404: "Model not served / no such route.",
        422: "Invalid request; `param` names the field.",
        499: "Client closed the connection.",
        500: "Unexpected server error (logged).",
        503: "Engine unavailable or failed; retryable.",
    }
    return {c: {"model": ErrorResponse, "description": described[c]} for c in codes}


router = APIRouter()


@router.post(
    "/v1/rollouts", response_model=RolloutResponse, responses=_errors(404, 422, 499, 500, 503)
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


@router.get("/v1/models", response_model=ModelList, responses=_errors(500))
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

    app = FastAPI(
        title="dvp-serve",
        summary="Rollouts with safe-vocabulary (DVP) metadata for LLM reinforcement learning.",
        version=_version(),
        lifespan=lifespan,
    )
    app.include_router(router)
    app.include_router(score_router)  # POST /v1/score (score.py)
    app.include_router(openai_router)  # POST /v1/completions, /v1/chat/completions
    install_error_handlers(app)
    app.add_middleware(MsgpackBodyMiddleware)  # inside the body limit: counts raw bytes
    app.add_middleware(BodyLimitMiddleware, limit=config.max_request_bytes)
    app.add_middleware(EngineGateMiddleware)  # 503 + Retry-After while the engine is down
    install_ops(app, config)  # weights + /metrics routes; auth, draining, metrics middleware
    install_body_decoding(app)  # JSON bodies decoded + validated off the loop (bodies.py)
    app.add_middleware(RequestIdMiddleware)  # outermost: stamps errors from inside too
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


class RequestIdMiddleware:
    """Give every request an id (the client's ``X-Request-Id`` if well-formed, else
    ``req-<uuid4 hex>``), store it in ``request.state.request_id`` and echo it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == REQUEST_ID_HEADER.encode()),
            "",
        )
        request_id = given if _VALID_REQUEST_ID.fullmatch(given) else f"req-{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


class _BodyTooLarge(HTTPException):
    """A body over the limit (FastAPI passes HTTPExceptions from body reading through)."""


class BodyLimitMiddleware:
    """Refuse a request body over ``limit`` bytes with a 413 error body.

    A ``Content-Length`` over the limit is refused before the body is used; a
    body without one (chunked) is counted as it arrives and refused once it
    passes the limit, so no request can make the server buffer more. Either way
    the rest of the body is first read and dropped (up to :attr:`drain_bytes`
    more, and not when the client waits for ``100 Continue``), so a client that
    is still sending reads the 413 instead of a connection reset; a body longer
    still gets the 413 and the connection closed.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.drain_bytes = max(limit, 16 << 20)

    def _too_large(self) -> HTTPException:
        return _BodyTooLarge(413, f"request body is over the limit of {self.limit} bytes")

    async def _drain(self, receive: Receive, budget: int) -> None:
        """Read and drop the rest of the body, at most ``budget`` bytes."""
        while budget >= 0:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            budget -= len(message.get("body", b""))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            if int(length) <= self.limit + self.drain_bytes and not headers.get(b"expect"):
                await self._drain(receive, self.limit + self.drain_bytes)
            await error_response(self._too_large())(scope, receive, send)
            return
        seen = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    if message.get("more_body", False):
                        await self._drain(receive, self.drain_bytes)
                    raise self._too_large()
            return message

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, send_tracking)
        except _BodyTooLarge as exc:  # raised outside the routes (the msgpack decoder)
            if not started:
                await error_response(exc)(scope, receive, send)
