"""dvp_client: what a trainer installs to use dvp-serve.

- the HTTP client (``Client``, ``AsyncClient``) and its exceptions,
- the safe-vocabulary rule in torch (``dvp_client.train.rule``; torch imported lazily),
- the pruned log-probs, policy losses and mismatch metrics (trainer side).
"""

from dvp_schemas import (
    PruningRule,
    Rollout,
    RolloutRequest,
    RolloutStreamChunk,
    RolloutStreamSummary,
    SamplingOptions,
    ScoreResponse,
    ScoreResult,
)

from ._client import AsyncClient, Client
from ._constants import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT
from ._exceptions import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APIStreamError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    DVPError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from ._replicas import ReplicaStats
from ._streaming import StreamEvent, join_rollout_stream
from ._types import NOT_GIVEN, NotGiven
from .batch import RolloutBatch

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "NOT_GIVEN",
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APIStreamError",
    "APITimeoutError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "DVPError",
    "InternalServerError",
    "NotFoundError",
    "NotGiven",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PruningRule",
    "RateLimitError",
    "ReplicaStats",
    "Rollout",
    "RolloutBatch",
    "RolloutRequest",
    "RolloutStreamChunk",
    "RolloutStreamSummary",
    "SamplingOptions",
    "ScoreResponse",
    "ScoreResult",
    "ServiceUnavailableError",
    "StreamEvent",
    "UnprocessableEntityError",
    "join_rollout_stream",
]

# Trainer-side names need torch: resolved on first access (PEP 562) so that the HTTP
# client imports without torch. They are left out of __all__ for the same reason
# (a star-import would pull torch in).
_TORCH_EXPORTS = {
    "Aggregation": "loss_options",
    "Correction": "loss_options",
    "PolicyLossConfig": "losses",
    "PolicyLossOutput": "losses",
    "policy_loss": "losses",
    "group_advantages": "advantages",
    "PrunedLogprobs": "objective",
    "pruned_logprobs": "objective",
    "RolloutTensors": "tensors",
    "SafeSets": "tensors",
    "batch_metrics": "metrics",
    "mismatch_metrics": "metrics",
    "staleness_metrics": "staleness",
}


def __getattr__(name: str) -> object:
    module = _TORCH_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".train.{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_TORCH_EXPORTS])
