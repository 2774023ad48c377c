"""A call as a value, and the pure functions that build one from a method's arguments.

:class:`RequestOptions` is what the core's retry plan needs for every attempt of
one call; the functions here validate arguments (before any network) and need
no client state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import httpx
from dvp_schemas import PruningRule, RolloutRequest, ScoreSequence

from . import _constants as C
from ._constants import IDEMPOTENT_METHODS
from ._types import NOT_GIVEN, Headers, NotGiven, NotGivenOr, PromptInput, TimeoutTypes

__all__ = [
    "SAMPLING_ARGS",
    "BaseURLInput",
    "RequestOptions",
    "ScoreInput",
    "build_rollout_request",
    "replica_urls",
    "request_options",
    "score_sequence",
]

ScoreInput = tuple[Sequence[int], Sequence[int]] | ScoreSequence | Mapping[str, object]
"""A sequence to score: ``(prompt_ids, completion_ids)``, a ScoreSequence, or its dict."""
BaseURLInput = str | httpx.URL | Sequence[str | httpx.URL] | None
"""One server's URL, a list of replicas' URLs, or None (``DVP_BASE_URL``, else the default)."""
SAMPLING_ARGS = ("temperature", "max_tokens", "stop", "stop_token_ids", "seed", "ignore_eos")
"""The arguments of ``rollouts(...)`` that go into the body's ``sampling`` object."""


@dataclass(frozen=True)
class RequestOptions:
    """One call, as the core needs it to build every attempt.

    Attributes:
        method: HTTP method.
        path: Path under the base URL, e.g. ``"/v1/rollouts"``.
        json: Body to send as JSON, or None for no body.
        extra_headers: Headers that override the client's for this call.
        timeout: This call's timeout; NOT_GIVEN means the client's.
        retryable: Whether another attempt is safe (the same effect twice is fine).
        answer_statuses: Non-2xx statuses that are an answer, not a failure: returned
            as they are, without retry (``GET /health`` answers 503 while starting).
        replica: Send every attempt to this replica (index into the URLs); None: pick.
        stream: The response is a stream: its replica is held until the shell ends it.
    """

    method: str
    path: str
    json: object = None
    extra_headers: Headers | None = None
    timeout: NotGivenOr[TimeoutTypes] = NOT_GIVEN
    retryable: bool = True
    answer_statuses: frozenset[int] = frozenset()
    replica: int | None = None
    stream: bool = False


def request_options(
    method: str,
    path: str,
    json: object,
    timeout: NotGivenOr[TimeoutTypes],
    extra_headers: Headers | None,
    safe_to_retry: bool | None,
) -> RequestOptions:
    """A call of any route (``Client.request``): retried only when it is safe to repeat
    (``safe_to_retry``; None: for the idempotent methods only, never a POST)."""
    retryable = method.upper() in IDEMPOTENT_METHODS if safe_to_retry is None else safe_to_retry
    return RequestOptions(method.upper(), path, json, extra_headers, timeout, retryable)


def build_rollout_request(
    prompts: PromptInput | Sequence[PromptInput],
    *,
    n: int,
    sampling: Mapping[str, object],
    pruning: PruningRule | Mapping[str, object] | None,
    return_safe_token_ids: bool,
    return_text: bool,
    model: str | None,
) -> RolloutRequest:
    """Validate ``rollouts(...)`` arguments into the wire model, before any network.

    Args:
        prompts: One text prompt, or a sequence of prompts (text, token ids, chat).
        n: Samples per prompt.
        sampling: SamplingOptions fields; NOT_GIVEN values are left out (server default).
        pruning: The rule; None leaves it to the server's default.
        return_safe_token_ids: Ask for the safe sets (sent packed, decoded into CSR).
        return_text: Ask for decoded text.
        model: Model id to check against the served one; None skips the check.

    Returns:
        The request; ``model_dump(exclude_unset=True)`` is the body to send.

    Raises:
        pydantic.ValidationError: A field is invalid (its location names it).
    """
    body: dict[str, object] = {
        "prompts": [prompts] if isinstance(prompts, str) else list(prompts),
        "n": n,
        "sampling": {k: v for k, v in sampling.items() if not isinstance(v, NotGiven)},
        "return_safe_token_ids": return_safe_token_ids,
        "return_text": return_text,
    }
    if return_safe_token_ids:  # a few bytes per id on the wire; decoded on receipt
        body["safe_token_ids_format"] = "packed"
    if pruning is not None:
        body["pruning"] = pruning
    if model is not None:
        body["model"] = model
    return RolloutRequest.model_validate(body)


def replica_urls(base_url: BaseURLInput) -> list[httpx.URL]:
    """The replicas' URLs, checked: absolute, no trailing slash, no repeats.

    Raises:
        ValueError: An empty list, a relative URL or a repeated one (named by index).
    """
    if base_url is None:
        base_url = os.environ.get(C.BASE_URL_ENV) or C.DEFAULT_BASE_URL
    single = isinstance(base_url, str | httpx.URL)
    given = [base_url] if isinstance(base_url, str | httpx.URL) else list(base_url)
    if not given:
        raise ValueError("base_url: an empty list of replicas; give at least one URL")
    urls: list[httpx.URL] = []
    for i, raw in enumerate(given):
        name = "base_url" if single else f"base_url[{i}]"
        url = httpx.URL(str(raw).rstrip("/"))
        if not url.is_absolute_url:
            raise ValueError(f"{name} must be an absolute http(s) URL, got {str(raw)!r}")
        if url in urls:
            raise ValueError(f"{name} repeats base_url[{urls.index(url)}] ({str(url)!r})")
        urls.append(url)
    return urls


def score_sequence(seq: ScoreInput) -> object:
    """A (prompt ids, completion ids) pair as the wire's ScoreSequence; others as given."""
    if isinstance(seq, tuple) and len(seq) == 2:
        return {"prompt_token_ids": list(seq[0]), "completion_token_ids": list(seq[1])}
    return seq
