"""dvp_schemas: the wire contract of dvp-serve (pydantic v2, no torch)."""

from .errors import ErrorInfo, ErrorResponse
from .models import EngineCapabilities, HealthResponse, ModelCard, ModelList, RolloutField
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

__all__ = [
    "ChatMessage",
    "EngineCapabilities",
    "ErrorInfo",
    "ErrorResponse",
    "FinishReason",
    "HealthResponse",
    "ModelCard",
    "ModelList",
    "Prompt",
    "PruningRule",
    "Rollout",
    "RolloutField",
    "RolloutRequest",
    "RolloutResponse",
    "SafeTokenIds",
    "SamplingOptions",
    "Usage",
]
