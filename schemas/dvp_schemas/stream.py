"""Streaming rollouts: ``POST /v1/rollouts`` with ``"stream": true``.

The response is NDJSON (``application/x-ndjson``, one JSON object per line), or,
when the request says ``Accept: application/msgpack``, a sequence of msgpack
maps. Every object has an ``object`` tag:

- ``"rollout.chunk"`` (:class:`RolloutStreamChunk`): steps ``start .. start+t-1``
  of one rollout, as soon as the engine hands them over (one engine chunk:
  every k decoding steps, and at the end). Chunks of different rollouts
  interleave; the chunks of one rollout arrive in order, the last one with
  ``finish_reason`` set.
- ``"rollout.summary"`` (:class:`RolloutStreamSummary`): the last object of a
  stream that succeeded: the request-level fields of a
  :class:`~dvp_schemas.RolloutResponse` and, per rollout, what only its end
  knows (the decoded text, the finish and stop reasons, the seed).
- ``"error"`` (:class:`RolloutStreamError`): the last object of a stream that
  failed after it started (the status line had been sent); every other
  rollout of the request was aborted.

Joining the chunks of a rollout in order and the summary gives exactly the
:class:`~dvp_schemas.Rollout` the non-streamed request returns.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from ._base import ResponseModel
from .errors import ErrorInfo
from .rollouts import AnySafeTokenIds, FinishReason, Usage
from .rule import PruningRule

NDJSON_MEDIA_TYPE = "application/x-ndjson"


class RolloutStreamChunk(ResponseModel):
    """Steps ``start .. start + len(token_ids) - 1`` of one rollout (columnar)."""

    object: Literal["rollout.chunk"] = "rollout.chunk"
    prompt_index: int = Field(description="Index into the request's prompts.")
    sample_index: int = Field(description="0..n-1 within its prompt.")
    start: int = Field(ge=0, description="Step index t of this chunk's first token.")
    token_ids: list[int] = Field(description="Tokens sampled in these steps.")
    logprobs: list[float | None] | None = Field(
        None, description="log p(y_t) (full tempered distribution); null where not exact."
    )
    masked_logprobs: list[float] = Field(description="log pi_S(y_t).")
    safe_logmass: list[float | None] | None = Field(None, description="log Z_S per step.")
    safe_sizes: list[int] = Field(description="|S_t| per step.")
    safe_token_ids: AnySafeTokenIds | None = Field(
        None,
        description="S_t ids of these steps, in the request's format (offsets / data start afresh "
        "in every chunk).",
    )
    outside_safe_set: list[int] | None = Field(
        None, description="Deprecated, always null (see Rollout.outside_safe_set)."
    )
    policy_version: int = Field(description="Weights version of this chunk's first token.")
    version_spans: list[tuple[int, int, int]] | None = Field(
        None,
        description="[step index, policy_version, kv_version] per run of equal versions "
        "in this chunk (step indices count from the rollout's start, as ``start``).",
    )
    finish_reason: FinishReason | None = Field(None, description="Set on the rollout's last chunk.")
    stop_reason: str | int | None = Field(None, description="Stop string / id, last chunk.")


class RolloutEnd(ResponseModel):
    """What a rollout's end tells, reported once per rollout in the summary."""

    prompt_index: int
    sample_index: int
    prompt_token_ids: list[int] = Field(description="The prompt as the engine saw it.")
    num_tokens: int = Field(description="Tokens generated (the sum over its chunks).")
    text: str | None = Field(None, description="Decoded completion (stop string removed).")
    finish_reason: FinishReason
    stop_reason: str | int | None = None
    policy_version: int
    seed: int | None = None


class RolloutStreamSummary(ResponseModel):
    """The last line of a stream that succeeded."""

    object: Literal["rollout.summary"] = "rollout.summary"
    id: str = Field(description="Request id (echoes X-Request-Id when given).")
    model: str
    engine: str
    temperature: float
    pruning: PruningRule = Field(description="The rule the safe sets were built with.")
    policy_version: int
    rollouts: list[RolloutEnd] = Field(description="Ordered by (prompt_index, sample_index).")
    usage: Usage


class RolloutStreamError(ResponseModel):
    """The last line of a stream that failed after it started."""

    object: Literal["error"] = "error"
    error: ErrorInfo


RolloutStreamEvent = Annotated[
    RolloutStreamChunk | RolloutStreamSummary | RolloutStreamError,
    Field(discriminator="object"),
]
"""One line of a rollout stream, tagged by ``object``."""
