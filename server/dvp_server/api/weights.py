"""Routes of policy weight updates: ``GET /v1/weights``, ``POST /v1/weights``,
``POST /v1/weights/upload``; the work is ``service/weights.py``'s :class:`WeightManager`.
"""

from __future__ import annotations

from dvp_schemas import WeightsInfo, WeightsUpdateRequest, WeightsUpdateResponse
from fastapi import APIRouter, Query, Request

from ..errors import validation_error
from ..service.weights import WeightManager
from .errors import responses

__all__ = ["router"]

router = APIRouter()
_ERRORS = responses(
    {
        401: "Missing or wrong API key.",
        403: "The path leaves the weights root, or path loads are disabled.",
        409: "In-flight rollouts did not drain in time; nothing changed.",
        413: "Upload over the body limit.",
        422: "Bad path, file or tensor (checked before the engine sees it), or the engine "
        "failed the load and kept the previous weights; the message names it.",
        500: "The engine failed the load and restarts with the previous weights.",
        501: "The engine cannot load weights.",
    }
)


def _manager(request: Request) -> WeightManager:
    return request.app.state.weights  # type: ignore[no-any-return]


@router.get("/v1/weights", response_model=WeightsInfo, responses=responses([401]))
async def get_weights(request: Request) -> WeightsInfo:
    """The served weights: policy_version, source, loaded_at.

    curl -s localhost:8000/v1/weights -H "authorization: Bearer $DVP_API_KEY"
    """
    return _manager(request).info()


@router.post("/v1/weights", response_model=WeightsUpdateResponse, responses=_ERRORS)
async def post_weights(body: WeightsUpdateRequest, request: Request) -> WeightsUpdateResponse:
    """Load weights from a safetensors file or directory under --weights-root.

    curl -s localhost:8000/v1/weights -H 'content-type: application/json' \\
      -d '{"path": "step-100/model.safetensors", "on_inflight": "drain"}'
    """
    return await _manager(request).update_from_path(body)


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post(
    "/v1/weights/upload",
    response_model=WeightsUpdateResponse,
    responses=_ERRORS,
    openapi_extra=_UPLOAD_BODY,
)
async def upload_weights(
    request: Request,
    on_inflight: str | None = Query(None, pattern="^(drain|abort|keep|recompute)$"),
    drain_timeout_s: float | None = Query(None, gt=0.0, le=86400.0),
    verify: bool | None = Query(None),
    kind: str = Query("checkpoint", pattern="^(checkpoint|adapter)$"),
) -> WeightsUpdateResponse:
    """Load weights from the body: one safetensors file (small models; --max-request-bytes),
    or with ``kind=adapter`` a tar (or .tar.gz) of a PEFT LoRA adapter folder.

    curl -s localhost:8000/v1/weights/upload --data-binary @model.safetensors \\
      -H 'content-type: application/octet-stream'
    tar -cf - -C lora adapter_config.json adapter_model.safetensors | curl -s \\
      'localhost:8000/v1/weights/upload?kind=adapter' --data-binary @-
    """
    body = await request.body()
    if not body:
        raise validation_error("body", f"the body must be a {kind}, got 0 bytes")
    return await _manager(request).update_from_bytes(
        body, on_inflight, drain_timeout_s, verify, kind
    )
