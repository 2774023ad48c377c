"""The one core shared by :class:`Client` and :class:`AsyncClient`.

It owns everything that does no I/O: the base URL, the headers, the request
bodies, the timeout, the retry decision and the backoff. The retry loop itself
is written once, as a plan (a generator) that the two shells drive::

    plan = core._plan(options)
    step = plan.send(None)
    # step is an httpx.Request -> the shell sends it and plan.send(response),
    #                             or plan.throw(transport_error)
    # step is a float          -> the shell sleeps that many seconds, plan.send(None)
    # StopIteration.value      -> the final 2xx response; any other outcome raises

so the sync and async clients differ only in how they send, sleep and close.
"""

from __future__ import annotations

import email.utils
import logging
import os
import platform
import random
import secrets
import time
import uuid
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Generic, TypeVar

import httpx
import pydantic
from dvp_schemas import HealthResponse, PruningRule, RolloutRequest, ScoreRequest, ScoreSequence

from . import _constants as C
from ._constants import IDEMPOTENT_METHODS
from ._exceptions import (
    APIConnectionError,
    APIResponseValidationError,
    APITimeoutError,
    make_status_error,
)
from ._types import NOT_GIVEN, Headers, NotGiven, NotGivenOr, PromptInput, TimeoutTypes

log = logging.getLogger("dvp_client")

_HttpxT = TypeVar("_HttpxT", httpx.Client, httpx.AsyncClient)
_ModelT = TypeVar("_ModelT", bound=pydantic.BaseModel)

Step = httpx.Request | float
"""What a plan asks its shell to do next: send this request, or sleep this long."""
Plan = Generator[Step, "httpx.Response | None", httpx.Response]
MSGPACK_MEDIA_TYPE = "application/msgpack"
ScoreInput = tuple[Sequence[int], Sequence[int]] | ScoreSequence | Mapping[str, object]
"""A sequence to score: ``(prompt_ids, completion_ids)``, a ScoreSequence, or its dict."""


def _user_agent() -> str:
    try:
        version = metadata.version("dvp-serve")
    except metadata.PackageNotFoundError:  # pragma: no cover - source tree without install
        version = "0+unknown"
    return f"dvp-client/{version} python/{platform.python_version()} httpx/{httpx.__version__}"


USER_AGENT = _user_agent()


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
    """

    method: str
    path: str
    json: object = None
    extra_headers: Headers | None = None
    timeout: NotGivenOr[TimeoutTypes] = NOT_GIVEN
    retryable: bool = True
    answer_statuses: frozenset[int] = frozenset()


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
        return_safe_token_ids: Ask for the safe sets (CSR).
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
    if pruning is not None:
        body["pruning"] = pruning
    if model is not None:
        body["model"] = model
    return RolloutRequest.model_validate(body)


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the server asked us to wait, from ``retry-after-ms`` or ``Retry-After``.

    Returns:
        The delay clamped to ``[0, MAX_RETRY_AFTER]``, or None when absent or unparsable.
    """
    seconds: float | None = None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            seconds = float(ms) / 1000.0
        except ValueError:
            seconds = None
    if seconds is None and (value := headers.get("retry-after")) is not None:
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            seconds = when.timestamp() - time.time()
    if seconds is None or seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), C.MAX_RETRY_AFTER)


def backoff_delay(retries_taken: int, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter (formula in :mod:`dvp_client._constants`).

    Args:
        retries_taken: Retries already made (0 before the first retry).
        rng: Source of the jitter; the module's ``random`` by default.

    Returns:
        Seconds in ``(base * (1 - RETRY_JITTER), base]``, ``base <= MAX_RETRY_DELAY``.
    """
    base = min(C.INITIAL_RETRY_DELAY * 2.0 ** min(retries_taken, 32), C.MAX_RETRY_DELAY)
    u = (rng or random).random()
    return base * (1.0 - C.RETRY_JITTER * u)


def should_retry(response: httpx.Response) -> bool:
    """Whether a status is worth another attempt: 408, 409, 429 and every 5xx."""
    return response.status_code in C.RETRY_STATUS_CODES or response.status_code >= 500


def resolve_seed(seed: NotGivenOr[int | None]) -> tuple[int | None, bool]:
    """The seed to send and whether the rollout request is then safe to retry.

    NOT_GIVEN draws a fresh 63-bit seed once, before the first attempt, so every
    retry is the same seeded request and reproduces the same samples. An explicit
    None asks for an unseeded rollout; a retry would draw different samples, so
    such a request is not retried.
    """
    if isinstance(seed, NotGiven):
        return secrets.randbits(63), True
    return seed, seed is not None


class BaseClient(Generic[_HttpxT]):
    """State and I/O-free logic of a client over one httpx client (sync or async)."""

    _client: _HttpxT

    def __init__(
        self,
        base_url: str | httpx.URL | None,
        *,
        api_key: str | None,
        timeout: NotGivenOr[TimeoutTypes],
        max_retries: int,
        http_client: _HttpxT,
        owns_http_client: bool,
        msgpack: bool = False,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if base_url is None:
            base_url = os.environ.get(C.BASE_URL_ENV) or C.DEFAULT_BASE_URL
        self.base_url = httpx.URL(str(base_url).rstrip("/"))
        if not self.base_url.is_absolute_url:
            raise ValueError(f"base_url must be an absolute http(s) URL, got {str(base_url)!r}")
        self.api_key = api_key if api_key is not None else os.environ.get(C.API_KEY_ENV)
        if isinstance(timeout, NotGiven):
            # An http_client configured with its own timeout keeps it.
            own = http_client.timeout
            timeout = C.DEFAULT_TIMEOUT if own == C.HTTPX_DEFAULT_TIMEOUT else own
        self.timeout: TimeoutTypes = timeout
        self.max_retries = max_retries
        self._client = http_client
        self._owns_http_client = owns_http_client
        self.msgpack = msgpack
        if msgpack:
            import msgpack as _msgpack  # noqa: F401  (fail here, not at the first call)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.base_url)!r})"

    # -- requests ---------------------------------------------------------------

    def _url(self, path: str) -> str:
        """The absolute URL of ``path``. (The one place a replica would be picked.)"""
        return f"{self.base_url}/{path.lstrip('/')}"

    def _headers(self, options: RequestOptions) -> dict[str, str]:
        headers = {
            "Accept": MSGPACK_MEDIA_TYPE if self.msgpack else "application/json",
            "User-Agent": USER_AGENT,
            C.REQUEST_ID_HEADER: uuid.uuid4().hex,
        }
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if options.extra_headers:
            headers.update(options.extra_headers)
        return headers

    def _build_request(self, options: RequestOptions, headers: Mapping[str, str]) -> httpx.Request:
        timeout = self.timeout if isinstance(options.timeout, NotGiven) else options.timeout
        if self.msgpack and options.json is not None:
            import msgpack

            return self._client.build_request(
                options.method,
                self._url(options.path),
                content=msgpack.packb(options.json),
                headers={**headers, "Content-Type": MSGPACK_MEDIA_TYPE},
                timeout=timeout,
            )
        return self._client.build_request(
            options.method,
            self._url(options.path),
            json=options.json,
            headers=headers,
            timeout=timeout,
        )

    def _rollouts_options(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        *,
        n: int,
        sampling: dict[str, Any],
        pruning: PruningRule | Mapping[str, object] | None,
        return_safe_token_ids: bool,
        return_text: bool,
        model: str | None,
        timeout: NotGivenOr[TimeoutTypes],
        extra_headers: Headers | None,
        stream: bool = False,
    ) -> RequestOptions:
        """The POST /v1/rollouts call; validates the body and fixes the seed first."""
        sampling["seed"], retryable = resolve_seed(sampling["seed"])
        request = build_rollout_request(
            prompts,
            n=n,
            sampling=sampling,
            pruning=pruning,
            return_safe_token_ids=return_safe_token_ids,
            return_text=return_text,
            model=model,
        )
        body = request.model_dump(mode="json", exclude_unset=True)
        if stream:
            body["stream"] = True
        return RequestOptions(
            "POST", "/v1/rollouts", body, extra_headers, timeout, retryable=retryable
        )

    def _score_options(
        self,
        sequences: Sequence[ScoreInput],
        *,
        temperature: float,
        pruning: PruningRule | Mapping[str, object] | None,
        return_safe_token_ids: bool,
        top_logprobs: int,
        model: str | None,
        timeout: NotGivenOr[TimeoutTypes],
        extra_headers: Headers | None,
    ) -> RequestOptions:
        """The POST /v1/score call (validated first; retried: scoring has no side effect)."""
        body: dict[str, object] = {
            "sequences": [_score_sequence(s) for s in sequences],
            "temperature": temperature,
            "return_safe_token_ids": return_safe_token_ids,
            "top_logprobs": top_logprobs,
        }
        if pruning is not None:
            body["pruning"] = pruning
        if model is not None:
            body["model"] = model
        request = ScoreRequest.model_validate(body)
        payload = request.model_dump(mode="json", exclude_unset=True)
        return RequestOptions("POST", "/v1/score", payload, extra_headers, timeout, retryable=True)

    # -- the retry loop -----------------------------------------------------------

    def _plan(self, options: RequestOptions) -> Plan:
        """The attempts of one call, as steps for a shell (see the module docstring).

        Every attempt carries the same headers (so the same X-Request-Id) and body.
        A transport error or a retryable status (:func:`should_retry`) leads to a
        sleep step and another attempt while retries remain and the call is
        ``retryable``; the sleep honours Retry-After, else backs off.

        Raises:
            APITimeoutError, APIConnectionError: No response on the last attempt.
            APIStatusError: A 4xx/5xx on the last attempt (the subclass by status).
        """
        headers = self._headers(options)
        max_retries = self.max_retries if options.retryable else 0
        retries_taken = 0
        while True:
            request = self._build_request(options, headers)
            try:
                response = yield request
            except httpx.TransportError as err:
                if retries_taken < max_retries:
                    yield self._retry_delay(options, retries_taken, None, repr(err))
                    retries_taken += 1
                    continue
                if isinstance(err, httpx.TimeoutException):
                    raise APITimeoutError(request) from err
                raise APIConnectionError(request) from err
            assert response is not None, "the shell must send back the response"
            if response.is_success or response.status_code in options.answer_statuses:
                return response
            if should_retry(response) and retries_taken < max_retries:
                reason = f"status {response.status_code}"
                yield self._retry_delay(options, retries_taken, response.headers, reason)
                retries_taken += 1
                continue
            raise make_status_error(response)

    def _retry_delay(
        self, options: RequestOptions, retries_taken: int, headers: httpx.Headers | None, why: str
    ) -> float:
        """The delay before the next retry (Retry-After first, else backoff), logged."""
        delay = parse_retry_after(headers) if headers is not None else None
        if delay is None:
            delay = backoff_delay(retries_taken)
        log.info(
            "%s %s: %s; retry %d of %d in %.2f s",
            options.method,
            options.path,
            why,
            retries_taken + 1,
            self.max_retries,
            delay,
        )
        return delay

    # -- responses -----------------------------------------------------------------

    def _health_options(self, timeout: NotGivenOr[TimeoutTypes]) -> RequestOptions:
        return RequestOptions("GET", "/health", timeout=timeout, answer_statuses=frozenset({503}))

    def _parse_health(self, response: httpx.Response) -> HealthResponse:
        """A 200 or 503 health answer; a 503 without one (a proxy's) raises."""
        if response.is_success:
            return self._parse(response, HealthResponse)
        try:
            return HealthResponse.model_validate(_json(response))
        except (APIResponseValidationError, pydantic.ValidationError):
            raise make_status_error(response) from None

    @staticmethod
    def _parse(response: httpx.Response, cast_to: type[_ModelT]) -> _ModelT:
        """The response body validated into ``cast_to``.

        Raises:
            APIResponseValidationError: The body is not JSON or does not fit.
        """
        body = _json(response)
        try:
            return cast_to.model_validate(body)
        except pydantic.ValidationError as err:
            msg = f"{response.request.method} {response.request.url.path}: {cast_to.__name__} "
            raise APIResponseValidationError(response, body, msg + str(err)) from err


def _score_sequence(seq: ScoreInput) -> object:
    """A (prompt ids, completion ids) pair as the wire's ScoreSequence; others as given."""
    if isinstance(seq, tuple) and len(seq) == 2:
        return {"prompt_token_ids": list(seq[0]), "completion_token_ids": list(seq[1])}
    return seq


def _json(response: httpx.Response) -> Any:
    """The decoded body, JSON or msgpack per its content type (None when empty)."""
    if not response.content:
        return None
    if "msgpack" in response.headers.get("content-type", ""):
        import msgpack

        try:
            return msgpack.unpackb(response.content, raw=False)
        except (ValueError, msgpack.UnpackException) as err:
            raise APIResponseValidationError(
                response, response.content[:200], f"response body is not msgpack: {err!r}"
            ) from err
    try:
        return response.json()
    except ValueError as err:
        raise APIResponseValidationError(
            response, response.text, f"response body is not JSON: {response.text[:200]!r}"
        ) from err
