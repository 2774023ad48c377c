"""HTTP routes a Ray Serve replica adds to the app: the fleet's weights.

- ``GET /v1/fleet``: the fleet's configured ``policy_version`` and what every
  live replica serves (:class:`dvp_schemas.FleetStatus`);
- ``POST /v1/weights``: a fleet update (every replica, one version) instead of
  the single-server one, same body and answer (plus ``replicas``);
- ``POST /v1/weights/upload``: refused (409): an upload would reach one replica.

Every answer carries ``X-DVP-Replica``: the Serve replica that served it
(``api/middleware.py`` stamps it once ``app.state.fleet`` is set).

No ``from __future__ import annotations`` here: the route parameters typed
``Request`` must resolve after Serve's cloudpickle (a string annotation does not,
and every call then answers 422).
"""

from typing import NoReturn

from dvp_schemas import FleetStatus, WeightsUpdateRequest, WeightsUpdateResponse
from fastapi import APIRouter, FastAPI, Request

from ..api.errors import responses
from ..errors import ServiceError
from .fleet import FleetReplica

__all__ = ["install_fleet", "router"]

router = APIRouter()
_ERRORS = responses(
    {
        401: "Missing or wrong API key.",
        403: "The path leaves the weights root, or path loads are disabled.",
        409: "The application was not deployed from a config (no fleet updates).",
        422: "Bad path, or a policy_version not above the fleet's.",
        502: "A replica failed to load the weights; the fleet's config is put back.",
        504: "Replicas did not serve the new version in time; the message names them.",
    }
)


def _fleet(request: Request) -> FleetReplica:
    return request.app.state.fleet  # type: ignore[no-any-return]


@router.get("/v1/fleet", response_model=FleetStatus, responses=responses([401]))
async def get_fleet(request: Request) -> FleetStatus:
    """The fleet's weight version and every live replica's.

    curl -s localhost:8000/v1/fleet
    """
    return await _fleet(request).status()


@router.post(
    "/v1/weights",
    response_model=WeightsUpdateResponse,
    responses=_ERRORS,
    name="post_fleet_weights",
)
async def post_fleet_weights(body: WeightsUpdateRequest, request: Request) -> WeightsUpdateResponse:
    """Load weights on every replica as one ``policy_version``; returns once all serve it.

    curl -s localhost:8000/v1/weights -H 'content-type: application/json' \\
      -d '{"path": "step-100", "policy_version": 100}'
    """
    return await _fleet(request).update(body)


@router.post(
    "/v1/weights/upload",
    response_model=None,
    responses={409: _ERRORS[409]},
    name="fleet_upload_refused",
)
async def upload_refused(request: Request) -> NoReturn:
    """Refused in a fleet: an upload would reach one replica only."""
    raise ServiceError(
        409,
        "conflict_error",
        "body: an upload reaches one replica of the fleet; put the checkpoint under the "
        "weights root every replica reads and POST /v1/weights",
        "body",
    )


def install_fleet(app: FastAPI, fleet: FleetReplica) -> None:
    """Add the fleet routes ahead of the single-server ones (the first match serves)."""
    app.state.fleet = fleet
    fleet.app = app
    app.include_router(router)
    n = len(router.routes)
    app.router.routes[:] = app.router.routes[-n:] + app.router.routes[:-n]
