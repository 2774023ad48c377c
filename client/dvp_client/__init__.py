"""dvp_client: what a trainer installs to use dvp-serve.

- the HTTP client (``Client``, ``AsyncClient``),
- the safe-vocabulary rule in torch (``dvp_client.rule``; torch imported lazily),
- the pruned log-probs, policy losses and mismatch metrics (trainer side).
"""

from dvp_schemas import PruningRule, Rollout, RolloutRequest, SamplingOptions

from .batch import RolloutBatch

__all__ = ["PruningRule", "Rollout", "RolloutBatch", "RolloutRequest", "SamplingOptions"]
