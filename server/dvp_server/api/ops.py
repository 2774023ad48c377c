"""Operations: the ops state of one app, and ``GET /metrics``.

``create_app`` makes one :class:`Ops` before the app (the middleware stack needs
its metrics and lifecycle) and, in its lifespan, calls :meth:`Ops.attach` with
the started engine; the serving layer then uses the engine that
:meth:`Ops.attach` returns (every rollout admitted).
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..config import ServerConfig
from ..engines.base import Engine
from ..service.admission import Admission, AdmittedEngine
from ..service.lifecycle import Lifecycle
from ..service.metrics import Metrics
from ..service.weights import WeightManager

__all__ = ["Ops", "router"]


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


router = APIRouter()


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics (text format 0.0.4).

    curl -s localhost:8000/metrics -H "authorization: Bearer $DVP_API_KEY"
    """
    ops: Ops = request.app.state.ops
    return Response(ops.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
