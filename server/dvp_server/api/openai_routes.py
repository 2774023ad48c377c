"""OpenAI-compatible routes: ``POST /v1/completions`` and ``POST /v1/chat/completions``.

Thin routes over :class:`~dvp_server.service.openai_serving.OpenAIService` (the mapping
onto the rollout service, the log-probs and the ``dvp`` extension are there).
The official ``openai`` client works against them::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    out = client.completions.create(model="smollm2", prompt="Hi", logprobs=1,
                                    extra_body={"min_p": 1e-3})
    out.choices[0].logprobs.token_logprobs, out.choices[0].model_extra["dvp"]
"""

from __future__ import annotations

from dvp_schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)
from fastapi import APIRouter, Request, Response

from ..service.openai_serving import OpenAIService
from .disconnect import run_until_disconnect
from .errors import responses

__all__ = ["router"]

router = APIRouter()

_RESPONSES = responses(
    {
        404: "Model not served.",
        409: "The weights changed between sampling and the top-k recomputation; retry.",
        422: "Invalid request (or an OpenAI option dvp-serve does not serve); `param` names it.",
        501: "Top-k log-probs on an engine that cannot score.",
        503: "Engine unavailable or failed; retryable.",
    }
)


def _service(request: Request) -> OpenAIService:
    service = getattr(request.app.state, "openai_service", None)
    if service is None or service.rollouts is not request.app.state.service:
        service = request.app.state.openai_service = OpenAIService(request.app.state.service)
    return service


@router.post("/v1/completions", response_model=CompletionResponse, responses=_RESPONSES)
async def completions(body: CompletionRequest, request: Request) -> Response:
    """OpenAI completions; the DVP fields in each choice's ``dvp``.

    curl -s localhost:8000/v1/completions -H 'content-type: application/json' -d '{
      "model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "Once upon a time",
      "max_tokens": 16, "n": 2, "logprobs": 1, "seed": 0, "min_p": 0.001}'
    """
    work = _service(request).completions(body, request.state.request_id)
    result = await run_until_disconnect(request, work)
    return Response(result.model_dump_json(), media_type="application/json")


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """OpenAI chat completions; the DVP fields in each choice's ``dvp``.

    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' -d '{
      "model": "SmolLM2-135M-Instruct.Q4_1",
      "messages": [{"role": "user", "content": "What is 7*8?"}],
      "max_tokens": 32, "logprobs": true, "top_logprobs": 2, "min_p": 0.001}'
    """
    work = _service(request).chat(body, request.state.request_id)
    result = await run_until_disconnect(request, work)
    return Response(result.model_dump_json(), media_type="application/json")
