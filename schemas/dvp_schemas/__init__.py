"""dvp_schemas: the wire contract of dvp-serve (pydantic v2, no torch)."""

from .errors import ErrorInfo, ErrorResponse
from .models import EngineCapabilities, HealthResponse, ModelCard, ModelList, RolloutField
from .openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DvpChoice,
    DvpInfo,
)
from .rollouts import (
    ChatMessage,
    FinishReason,
    Prompt,
    Rollout,
    RolloutRequest,
    RolloutResponse,
    SafeTokenIds,
    SamplingOptions,
    Usage,
)
from .rule import PruningRule
from .score import ScoreRequest, ScoreResponse, ScoreResult, ScoreSequence, TopLogprobs
from .stream import (
    NDJSON_MEDIA_TYPE,
    RolloutEnd,
    RolloutStreamChunk,
    RolloutStreamError,
    RolloutStreamEvent,
    RolloutStreamSummary,
)
from .weights import (
    FleetStatus,
    InflightPolicy,
    ReplicaWeights,
    WeightsInfo,
    WeightsUpdateRequest,
    WeightsUpdateResponse,
)

__all__ = [
    "NDJSON_MEDIA_TYPE",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessage",
    "CompletionRequest",
    "CompletionResponse",
    "DvpChoice",
    "DvpInfo",
    "EngineCapabilities",
    "ErrorInfo",
    "ErrorResponse",
    "FinishReason",
    "FleetStatus",
    "HealthResponse",
    "InflightPolicy",
    "ModelCard",
    "ModelList",
    "Prompt",
    "PruningRule",
    "ReplicaWeights",
    "Rollout",
    "RolloutEnd",
    "RolloutField",
    "RolloutRequest",
    "RolloutResponse",
    "RolloutStreamChunk",
    "RolloutStreamError",
    "RolloutStreamEvent",
    "RolloutStreamSummary",
    "SafeTokenIds",
    "SamplingOptions",
    "ScoreRequest",
    "ScoreResponse",
    "ScoreResult",
    "ScoreSequence",
    "TopLogprobs",
    "Usage",
    "WeightsInfo",
    "WeightsUpdateRequest",
    "WeightsUpdateResponse",
]
