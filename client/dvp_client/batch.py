"""The client-side view of a rollout response."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dvp_schemas import PackedSafeTokenIds, RolloutResponse
from pydantic import model_validator

from .safe_ids import as_list_form

if TYPE_CHECKING:  # torch is optional for the HTTP client: imported only in to_torch
    import torch

    from .train.tensors import RolloutTensors


class RolloutBatch(RolloutResponse):
    """A :class:`dvp_schemas.RolloutResponse` as returned by :class:`dvp_client.Client`.

    Safe sets that arrived packed (the client asks for ``"packed"``: a few bytes per
    id on the wire) are decoded on receipt, so every rollout's ``safe_token_ids`` is
    the CSR :class:`dvp_schemas.SafeTokenIds` (an empty row: the whole vocabulary).
    """

    @model_validator(mode="after")
    def _unpack_safe_sets(self) -> RolloutBatch:
        for r in self.rollouts:
            if isinstance(r.safe_token_ids, PackedSafeTokenIds):
                r.safe_token_ids = as_list_form(r.safe_token_ids, r.safe_sizes)
        return self

    def to_torch(
        self, *, device: torch.device | str | None = None, pad_id: int = 0
    ) -> RolloutTensors:
        """The batch as padded tensors plus replayable safe sets (needs torch).

        Prompts are left-padded, completions right-padded, so
        ``tensors.completion_logits(model_logits)`` is a view; safe sets come as
        CSR (:class:`dvp_client.train.tensors.SafeSets`). See :mod:`dvp_client.train.tensors`.

        Args:
            device: where the tensors go (default: CPU).
            pad_id: the id written into padding positions.

        Raises:
            ValueError: inconsistent per-step arrays (the message names the rollout).
        """
        from .train.tensors import rollouts_to_tensors

        return rollouts_to_tensors(self, device=device, pad_id=pad_id)
