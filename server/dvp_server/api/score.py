"""``POST /v1/score``: teacher-forced log-probs of given sequences (``service/score.py``)."""

from __future__ import annotations

from dvp_schemas import ScoreRequest, ScoreResponse
from fastapi import APIRouter, Request, Response

from ..service.score import ScoreService
from .codecs import model_response
from .disconnect import run_until_disconnect
from .errors import responses

__all__ = ["router"]

router = APIRouter()


@router.post("/v1/score", response_model=ScoreResponse, responses=responses([404, 422, 501, 503]))
async def score(body: ScoreRequest, request: Request) -> Response:
    """Teacher-forced log-probs, masked log-probs, log Z_S and safe sets of given tokens.

    curl -s localhost:8000/v1/score -H 'content-type: application/json' -d '{
      "sequences": [{"prompt_token_ids": [1, 2, 3], "completion_token_ids": [4, 5, 6]}],
      "temperature": 1.0, "pruning": {"min_p": 0.001}, "return_safe_token_ids": true}'
    """
    service = ScoreService(request.app.state.service)
    result = await run_until_disconnect(request, service.score(body, request.state.request_id))
    return model_response(request, result)
