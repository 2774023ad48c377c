"""The client-side view of a rollout response."""

from __future__ import annotations

from dvp_schemas import RolloutResponse


class RolloutBatch(RolloutResponse):
    """A :class:`dvp_schemas.RolloutResponse` as returned by :class:`dvp_client.Client`."""
