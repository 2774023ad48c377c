"""Operations wiring: auth, metrics, admission, weights and shutdown on one app.

``create_app`` calls :func:`install_ops` once (routes, middleware, the 429
handler) and, in its lifespan, :meth:`Ops.attach` with the started engine; the
serving layer then uses the engine that :meth:`Ops.attach` returns (every
rollout admitted). The HTTP stack, outermost first::

    RequestId -> Metrics -> Draining (503 after SIGTERM) -> Auth (401)
      -> body limit (413) -> ... -> routes
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..config import ServerConfig
from ..engines.base import Engine
from ..errors import error_response
from ..service.admission import Admission, AdmittedEngine, QueueFullError
from ..service.lifecycle import DrainingMiddleware, Lifecycle
from ..service.metrics import Metrics, MetricsMiddleware
from ..service.metrics import router as metrics_router
from ..service.weights import WeightManager
from ..service.weights import router as weights_router
from .auth import AuthMiddleware

__all__ = ["Ops", "install_ops"]


class Ops:
    """The operational state of one app (``app.state.ops``).

    Attributes:
        metrics: the app's Prometheus registry and hooks.
        lifecycle: the draining flag set on SIGTERM.
        admission: slots and the weight gate (after :meth:`attach`).
        weights: the weight-update manager (after :meth:`attach`).
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.lifecycle = Lifecycle()
        self.admission: Admission | None = None
        self.weights: WeightManager | None = None

    def attach(self, app: FastAPI, engine: Engine) -> Engine:
        """Put admission, metrics and weight updates around a started engine.

        Returns:
            The engine the serving layer must use (:class:`AdmittedEngine`).
        """
        cfg = self.config
        self.admission = Admission(cfg.max_batch + cfg.max_queue)
        self.metrics.bind(engine, self.admission, cfg.max_batch)
        self.weights = WeightManager(engine, self.admission, cfg)
        app.state.weights = self.weights
        return AdmittedEngine(engine, self.admission)  # type: ignore[return-value]

    def detach(self) -> None:
        """Release what :meth:`attach` made (the upload staging directory)."""
        if self.weights is not None:
            self.weights.close()


async def _queue_full(request: Request, exc: Exception) -> JSONResponse:
    response = error_response(exc)
    response.headers["Retry-After"] = str(getattr(exc, "retry_after_s", 1))
    return response


def install_ops(app: FastAPI, config: ServerConfig) -> Ops:
    """Add the ops routes, the 429 handler and the middleware (see the module docstring).

    Call it after the body-limit middleware and before the request-id one.
    """
    ops = Ops(config)
    app.state.ops = ops
    app.include_router(weights_router)
    app.include_router(metrics_router)
    app.add_exception_handler(QueueFullError, _queue_full)
    app.add_middleware(AuthMiddleware, api_key=config.api_key)
    app.add_middleware(DrainingMiddleware, lifecycle=ops.lifecycle)
    app.add_middleware(MetricsMiddleware, metrics=ops.metrics)
    return ops
