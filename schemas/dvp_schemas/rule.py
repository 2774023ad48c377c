"""The safe-vocabulary rule: which tokens of a step form the safe set S_t.

Applied in vLLM's order (see docs/protocol.md):
temperature -> min_p -> top_k -> top_p.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from ._base import RequestModel

MAX_TOP_K = 2**31 - 1  # above any vocabulary; bigger ints do not fit the engines' int64 math


class PruningRule(RequestModel):
    """The rule that defines the per-step safe vocabulary S_t.

    With the defaults (min_p=0, top_k=None, top_p=1) S_t is the whole vocabulary
    and nothing is pruned.
    """

    min_p: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="DVP threshold rho: keep tokens with p >= rho * max(p). 0 keeps all.",
    )
    top_k: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_K,
        description="Then keep at most the k most probable tokens. 0 or null: no cap.",
    )
    top_p: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Then keep the smallest most-probable prefix whose renormalised mass "
        "reaches top_p (always at least one token). 1: no cut.",
    )

    @model_validator(mode="after")
    def _normalise_top_k(self) -> PruningRule:
        if self.top_k == 0:
            self.top_k = None
        return self

    @property
    def prunes(self) -> bool:
        """True when the rule can drop a token (it is not the identity)."""
        return self.min_p > 0.0 or self.top_k is not None or self.top_p < 1.0
