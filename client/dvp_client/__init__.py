"""dvp_client: what a trainer installs to use dvp-serve.

- the HTTP client (``Client``, ``AsyncClient``) and its exceptions,
- the safe-vocabulary rule in torch (``dvp_client.rule``; torch imported lazily),
- the pruned log-probs, policy losses and mismatch metrics (trainer side).
"""

from dvp_schemas import PruningRule, Rollout, RolloutRequest, SamplingOptions

from ._client import AsyncClient, Client
from ._constants import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT
from ._exceptions import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
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
    "Rollout",
    "RolloutBatch",
    "RolloutRequest",
    "SamplingOptions",
    "ServiceUnavailableError",
    "UnprocessableEntityError",
]
