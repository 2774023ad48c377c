"""Scoring (``POST /v1/score``): teacher-forced log-probs of given sequences under the rule.

:class:`ScoreService` checks a :class:`dvp_schemas.ScoreRequest` against the
served model and the server limits (the same limits as rollouts: sequences
per request, vocabulary, context length; 422 naming the field), asks the
engine's optional :class:`~dvp_server.engines.scoring.Scorer` capability, and
turns its arrays into the wire's columns (-inf masked log-probs -> null with
``in_safe_set`` false, NaN -> null). An engine that cannot score answers 501.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from dvp_schemas import ScoreRequest, ScoreResponse, ScoreResult, TopLogprobs, Usage

from ..engines.base import EngineError
from ..engines.scoring import ScoredSequence, ScoreParams
from ..errors import ServiceError, validation_error
from .assembly import nan_to_null, wire_safe_ids
from .params import effective_rule
from .serving import RolloutService

__all__ = ["ScoreService"]


class ScoreService:
    """Serves ``POST /v1/score`` with the engine, tokenizer and limits of the rollout service."""

    def __init__(self, rollouts: RolloutService) -> None:
        self.rollouts = rollouts
        self.engine: Any = rollouts.engine

    async def score(self, request: ScoreRequest, request_id: str) -> ScoreResponse:
        """Score every sequence (see the module docstring).

        Raises:
            ServiceError: 404 / 422 for a request that does not fit; 501 when the
                engine cannot score.
            EngineError: the engine is not running or failed.
        """
        info = self.engine.info
        if not info.capabilities.score or not hasattr(self.engine, "score"):
            raise ServiceError(
                501,
                "not_implemented_error",
                f"POST /v1/score: the {info.name} engine does not score sequences "
                "(capabilities.score is false); serve with --engine torch to score",
            )
        if self.engine.state != "running":
            raise EngineError(f"the {info.name} engine is {self.engine.state}")
        rule = self._check(request)
        sequences = [(s.prompt_token_ids, s.completion_token_ids) for s in request.sequences]
        params = ScoreParams(
            temperature=request.temperature,
            rule=rule,
            return_safe_token_ids=request.return_safe_token_ids,
            top_logprobs=request.top_logprobs,
        )
        try:
            scored = await self.engine.score(sequences, params)
        except ValueError as exc:  # an engine limit the checks above do not know
            msg = str(exc)
            if not msg.startswith("sequences."):
                raise
            raise ServiceError(422, "invalid_request_error", msg, msg.split(":", 1)[0]) from exc
        fields = set(info.capabilities.fields)
        results = [
            _result(i, seq[1], s, fields, request, self.engine.info.vocab_size)
            for i, (seq, s) in enumerate(zip(sequences, scored, strict=True))
        ]
        prompt_tokens = sum(len(p) for p, _ in sequences)
        completion = sum(len(c) for _, c in sequences)
        return ScoreResponse(
            id=request_id,
            model=self.rollouts.model_id,
            engine=info.name,
            temperature=request.temperature,
            pruning=rule,
            policy_version=max(s.policy_version for s in scored),
            results=results,
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion,
                total_tokens=prompt_tokens + completion,
            ),
        )

    def _check(self, request: ScoreRequest) -> Any:
        """Model, limits, ids and lengths; returns the effective rule."""
        cfg, info = self.rollouts.config, self.engine.info
        if request.model is not None and request.model not in (self.rollouts.model_id, cfg.model):
            raise ServiceError(
                404,
                "not_found_error",
                f"model: {request.model!r} is not served here; this server serves "
                f"{self.rollouts.model_id!r}",
                "model",
            )
        if len(request.sequences) > cfg.max_rollouts_per_request:
            raise validation_error(
                "sequences",
                f"{len(request.sequences)} sequences is over the server limit of "
                f"{cfg.max_rollouts_per_request} per request",
            )
        for i, seq in enumerate(request.sequences):
            for name in ("prompt_token_ids", "completion_token_ids"):
                self.rollouts.check_vocab(f"sequences.{i}.{name}", getattr(seq, name))
            total = len(seq.prompt_token_ids) + len(seq.completion_token_ids)
            if total > info.max_model_len:
                raise validation_error(
                    f"sequences.{i}",
                    f"prompt + completion is {total} tokens, over the model's context of "
                    f"{info.max_model_len}",
                )
        try:
            return effective_rule(request.pruning, info.capabilities.max_top_k)
        except ValueError as exc:
            raise validation_error("pruning.top_k", str(exc)) from exc


def _result(
    index: int,
    tokens: list[int],
    s: ScoredSequence,
    fields: set[str],
    request: ScoreRequest,
    vocab_size: int,
) -> ScoreResult:
    """One engine result as the wire's columns."""
    safe = None
    if request.return_safe_token_ids and s.safe_ids is not None and s.safe_offsets is not None:
        safe = wire_safe_ids(  # a whole-vocabulary set as the marker, as in rollouts
            s.safe_offsets.astype(np.int64),
            s.safe_ids.astype(np.int64),
            s.sizes.astype(np.int64),
            vocab_size,
            "list",
        )
    top = None
    if request.top_logprobs and s.top_ids is not None and s.top_logprobs is not None:
        top = TopLogprobs(
            ids=s.top_ids.tolist(),
            logprobs=[nan_to_null(row, infinite=True) for row in s.top_logprobs],
        )
    return ScoreResult(
        index=index,
        token_ids=tokens,
        logprobs=nan_to_null(s.logprobs, infinite=True) if "logprobs" in fields else None,
        masked_logprobs=nan_to_null(s.masked, infinite=True),
        in_safe_set=s.in_safe_set.astype(bool).tolist(),
        safe_logmass=nan_to_null(s.logmass, infinite=True) if "safe_logmass" in fields else None,
        safe_sizes=s.sizes.astype(np.int64).tolist(),
        safe_token_ids=safe,
        top_logprobs=top,
    )
