"""GET /v1/models, GET /health: what is served and by which engine."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ._base import ResponseModel
from .weights import LoraAdapterInfo

# Per-token fields an engine may return. Engines list the ones they fill exactly.
RolloutField = Literal[
    "token_ids", "logprobs", "masked_logprobs", "safe_logmass", "safe_sizes", "safe_token_ids"
]


class EngineCapabilities(ResponseModel):
    fields: list[RolloutField] = Field(description="Per-token fields this engine returns.")
    exact_at_any_temperature: list[RolloutField] = Field(
        description="Fields exact at every temperature (others may be null when T != 1)."
    )
    max_top_k: int | None = Field(
        None, description="Largest safe set the engine can describe exactly (None: whole vocab)."
    )
    score: bool = Field(
        False, description="Whether POST /v1/score (teacher-forced recomputation) is served."
    )
    quantization: str | None = Field(
        None,
        description="Weight quantization of the engine, e.g. 'fp8-e4m3-block128' (linears "
        "rounded to float8 e4m3 with 128x128 block scales, computed in `dtype`); null: none.",
    )


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "dvp-serve"
    engine: str
    dtype: str
    vocab_size: int
    max_model_len: int
    policy_version: int
    capabilities: EngineCapabilities
    adapter: LoraAdapterInfo | None = Field(
        None, description="The LoRA adapter served on the base weights; null: none."
    )


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(ResponseModel):
    status: Literal["ok", "starting", "degraded", "dead"]
    engine: str
    engine_state: str
    policy_version: int
    active_rollouts: int | None = Field(
        None,
        description="Rollouts the engine holds (queued or decoding, not yet finished or "
        "aborted); null when the engine does not count them.",
    )
