"""POST /v1/score: teacher-forced log-probs of given token sequences under the rule.

For each sequence (prompt ids + completion ids) the engine runs the model over
the whole sequence (teacher forcing) and, for every completion position t,
applies the rule to the logits that predict y_t. The per-step fields are those
of a :class:`~dvp_schemas.Rollout`, with one difference: a given token may lie
outside its safe set, so ``masked_logprobs[t]`` is null there (log pi_S = -inf)
and ``in_safe_set[t]`` is false.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ._base import RequestModel, ResponseModel
from .rollouts import SafeTokenIds, Usage
from .rule import PruningRule

MAX_SCORE_TOP_LOGPROBS = 20


class ScoreSequence(RequestModel):
    """One sequence to score: the prompt (context only) and the completion (scored)."""

    prompt_token_ids: list[int] = Field(min_length=1, description="Context token ids.")
    completion_token_ids: list[int] = Field(
        min_length=1, description="Token ids y_1..y_T scored one by one."
    )


class ScoreRequest(RequestModel):
    """Score completions under the rule at a temperature.

    Example::

        {"sequences": [{"prompt_token_ids": [1, 2, 3], "completion_token_ids": [4, 5]}],
         "temperature": 1.0, "pruning": {"min_p": 0.001}, "return_safe_token_ids": true}
    """

    sequences: list[ScoreSequence] = Field(min_length=1, description="Sequences to score.")
    temperature: float = Field(
        1.0, ge=0.0, le=100.0, description="Softmax temperature T; 0 is greedy (S = {argmax})."
    )
    pruning: PruningRule = Field(default_factory=PruningRule)
    return_safe_token_ids: bool = Field(False, description="Return every step's S (CSR).")
    top_logprobs: int = Field(
        0,
        ge=0,
        le=MAX_SCORE_TOP_LOGPROBS,
        description="Also return the k most probable tokens of every step (full tempered "
        "distribution) with their log-probs.",
    )
    model: str | None = Field(None, description="Model id; checked against the served model.")


class TopLogprobs(ResponseModel):
    """The k most probable tokens per step, descending: ``ids[t][i]``, ``logprobs[t][i]``."""

    ids: list[list[int]]
    logprobs: list[list[float | None]]


class ScoreResult(ResponseModel):
    """Per-step arrays (length T = number of completion tokens) for one sequence."""

    index: int = Field(description="Index into the request's sequences.")
    token_ids: list[int] = Field(description="The completion tokens y_1..y_T, as given.")
    logprobs: list[float | None] | None = Field(
        None, description="log p(y_t), full tempered distribution; null where not exact."
    )
    masked_logprobs: list[float | None] = Field(
        description="log pi_S(y_t); null where y_t is outside S_t (in_safe_set false)."
    )
    in_safe_set: list[bool] = Field(description="Whether y_t is in S_t.")
    safe_logmass: list[float | None] | None = Field(
        None, description="log Z_S per step; null where not exact."
    )
    safe_sizes: list[int] = Field(description="|S_t| per step.")
    safe_token_ids: SafeTokenIds | None = Field(None, description="S_t ids, when asked.")
    top_logprobs: TopLogprobs | None = Field(None, description="Top-k per step, when asked.")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class ScoreResponse(ResponseModel):
    """Results in the order of the request's sequences."""

    id: str = Field(description="Request id (echoes X-Request-Id when given).")
    object: Literal["score"] = "score"
    model: str
    engine: str
    temperature: float
    pruning: PruningRule = Field(description="The rule the safe sets were built with.")
    policy_version: int = Field(description="Weights version every sequence was scored with.")
    results: list[ScoreResult]
    usage: Usage = Field(description="prompt_tokens: context; completion_tokens: scored.")
