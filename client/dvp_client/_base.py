"""The one core shared by :class:`Client` and :class:`AsyncClient`.

It owns everything that does no I/O: the replicas' URLs, the headers, the request
bodies, the timeout, the retry decision and the backoff. The retry loop itself
is written once, as a plan (a generator) that the two shells drive::

    plan = core._plan(options)
    step = plan.send(None)
    # step is an httpx.Request -> the shell sends it and plan.send(response),
    #                             or plan.throw(transport_error)
    # step is a float          -> the shell sleeps that many seconds, plan.send(None)
    # StopIteration.value      -> the final 2xx response; any other outcome raises

so the sync and async clients differ only in how they send, sleep and close.

Every attempt goes to a replica picked by the client's
:class:`~dvp_client._replicas.ReplicaPool` (least outstanding; a client over one
URL has a pool of one). A failed attempt that may be repeated
(:func:`~dvp_client._retry.may_repeat`) fails over at once to a replica that is
up and not yet tried, else waits the backoff; either way it counts against
``max_retries``. A stream holds its replica until the shell ends it
(:meth:`BaseClient._end_stream`): it fails over only before its response began.
"""

from __future__ import annotations

import logging
import os
import platform
import uuid
from collections.abc import Generator, Mapping, Sequence
from importlib import metadata
from typing import Any, Generic, TypeVar

import httpx
import pydantic
from dvp_schemas import (
    HealthResponse,
    PruningRule,
    ScoreRequest,
    WeightsUpdateRequest,
)

from . import _constants as C
from ._exceptions import (
    APIConnectionError,
    APIResponseValidationError,
    APITimeoutError,
    DVPError,
    make_status_error,
)
from ._options import (
    SAMPLING_ARGS,
    BaseURLInput,
    RequestOptions,
    ScoreInput,
    build_rollout_request,
    replica_urls,
    score_sequence,
)
from ._replicas import Lease, Outcome, ReplicaPool, ReplicaStats
from ._retry import (
    backoff_delay,
    may_repeat,
    parse_retry_after,
    resolve_seed,
    should_retry,
)
from ._types import Headers, NotGiven, NotGivenOr, TimeoutTypes

log = logging.getLogger("dvp_client")

_HttpxT = TypeVar("_HttpxT", httpx.Client, httpx.AsyncClient)
_ModelT = TypeVar("_ModelT", bound=pydantic.BaseModel)

Step = httpx.Request | float
"""What a plan asks its shell to do next: send this request, or sleep this long."""
Plan = Generator[Step, "httpx.Response | None", httpx.Response]
MSGPACK_MEDIA_TYPE = "application/msgpack"


def _user_agent() -> str:
    try:
        version = metadata.version("dvp-serve")
    except metadata.PackageNotFoundError:  # pragma: no cover - source tree without install
        version = "0+unknown"
    return f"dvp-client/{version} python/{platform.python_version()} httpx/{httpx.__version__}"


USER_AGENT = _user_agent()


class BaseClient(Generic[_HttpxT]):
    """State and I/O-free logic of a client over one httpx client (sync or async).

    Attributes:
        base_url: The (first) server's URL.
        base_urls: Every replica's URL, in the order given.
    """

    _client: _HttpxT

    def __init__(
        self,
        base_url: BaseURLInput,
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
        self._pool = ReplicaPool(replica_urls(base_url))
        self.base_urls: tuple[httpx.URL, ...] = tuple(self._pool.urls)
        self.base_url = self.base_urls[0]
        self._streams: dict[httpx.Response, Lease] = {}  # open streams -> their replica
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
        urls = [str(u) for u in self.base_urls]
        return f"{type(self).__name__}({urls[0] if len(urls) == 1 else urls!r})"

    def replica_stats(self) -> list[ReplicaStats]:
        """Per-replica stats (one entry per URL, in order): outstanding attempts,
        attempts sent, failures, the last error, health, cooldown and mean latency."""
        return self._pool.stats()

    # -- requests ---------------------------------------------------------------

    def _url(self, path: str, base: httpx.URL | None = None) -> str:
        """The absolute URL of ``path`` on replica ``base`` (the first one by default)."""
        return f"{self.base_url if base is None else base}/{path.lstrip('/')}"

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

    def _build_request(
        self, options: RequestOptions, headers: Mapping[str, str], base: httpx.URL
    ) -> httpx.Request:
        timeout = self.timeout if isinstance(options.timeout, NotGiven) else options.timeout
        url = self._url(options.path, base)
        if self.msgpack and options.json is not None:
            import msgpack

            return self._client.build_request(
                options.method,
                url,
                content=msgpack.packb(options.json),
                headers={**headers, "Content-Type": MSGPACK_MEDIA_TYPE},
                timeout=timeout,
            )
        return self._client.build_request(
            options.method,
            url,
            json=options.json,
            headers=headers,
            timeout=timeout,
        )

    def _rollouts_options(self, call: Mapping[str, Any], *, stream: bool) -> RequestOptions:
        """The POST /v1/rollouts call from a shell's arguments; validates the body and
        fixes the seed first.

        The shells' ``rollouts`` / ``stream_rollouts`` hold only the signature (and
        its docs) and pass their ``locals()``; this is the one place that turns the
        arguments into a request.

        Args:
            call: The shell method's arguments by name (``self`` is ignored); every
                parameter of :meth:`dvp_client.Client.rollouts`.
            stream: Ask for a stream (``"stream": true``).

        Raises:
            pydantic.ValidationError: An argument is invalid (nothing was sent).
        """
        args = {k: v for k, v in call.items() if k != "self"}
        sampling: dict[str, Any] = {k: args.pop(k) for k in SAMPLING_ARGS}
        timeout: NotGivenOr[TimeoutTypes] = args.pop("timeout")
        extra_headers: Headers | None = args.pop("extra_headers")
        sampling["seed"], retryable = resolve_seed(sampling["seed"])
        request = build_rollout_request(sampling=sampling, **args)
        body = request.model_dump(mode="json", exclude_unset=True)
        if stream:
            body["stream"] = True
        return RequestOptions(
            "POST",
            "/v1/rollouts",
            body,
            extra_headers,
            timeout,
            retryable=retryable,
            stream=stream,
        )

    def _weights_options(
        self,
        path: str | os.PathLike[str],
        *,
        on_inflight: str | None,
        drain_timeout_s: float | None,
        policy_version: int | None,
        timeout: NotGivenOr[TimeoutTypes],
        extra_headers: Headers | None,
    ) -> list[RequestOptions]:
        """The POST /v1/weights call, once per replica (each must serve the new weights).

        Not retried once it may have reached a server (a second update would bump
        ``policy_version`` again); retried on connect errors, on the same replica.

        Raises:
            pydantic.ValidationError: An argument is invalid (nothing was sent).
        """
        body: dict[str, object] = {"path": os.fspath(path)}
        if on_inflight is not None:
            body["on_inflight"] = on_inflight
        if drain_timeout_s is not None:
            body["drain_timeout_s"] = drain_timeout_s
        if policy_version is not None:
            body["policy_version"] = policy_version
        request = WeightsUpdateRequest.model_validate(body)
        payload = request.model_dump(mode="json", exclude_unset=True)
        return [
            RequestOptions(
                "POST", "/v1/weights", payload, extra_headers, timeout, retryable=False, replica=i
            )
            for i in range(len(self._pool))
        ]

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
            "sequences": [score_sequence(s) for s in sequences],
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

        Every attempt carries the same headers (so the same X-Request-Id) and body,
        and takes a replica from the pool (``options.replica``, else the pick, which
        avoids the replicas this call already tried). A transport error or a
        retryable status (:func:`should_retry`) leads to another attempt while
        retries remain and it is safe (:func:`may_repeat`): at once on a replica that
        is up and untried, else after a sleep step that honours Retry-After, else
        backs off. A shell that stops driving the plan must ``close()`` it (the
        replica is given back).

        Raises:
            APITimeoutError, APIConnectionError: No response on the last attempt.
            APIStatusError: A 4xx/5xx on the last attempt (the subclass by status).
        """
        headers = self._headers(options)
        retries_taken = 0
        tried: set[int] = set()
        while True:
            lease = self._pool.acquire(avoid=tried, pin=options.replica)
            tried.add(lease.index)
            request = self._build_request(options, headers, lease.url)
            try:
                response = yield request
            except httpx.TransportError as err:
                self._pool.release(lease, "down", repr(err))
                if retries_taken < self.max_retries and may_repeat(options.retryable, err):
                    delay = self._retry_delay(options, retries_taken, tried, None, repr(err))
                    if delay is not None:
                        yield delay
                    retries_taken += 1
                    continue
                if isinstance(err, httpx.TimeoutException):
                    raise APITimeoutError(request) from err
                raise APIConnectionError(request) from err
            except BaseException:  # the shell gave up (cancelled, interrupted)
                self._pool.release(lease, "dropped")
                raise
            assert response is not None, "the shell must send back the response"
            status = response.status_code
            if response.is_success and options.stream:
                self._streams[response] = lease  # held until the shell ends the stream
            else:
                wait = parse_retry_after(response.headers)
                self._pool.release(lease, _outcome(status), f"status {status}", wait)
            if response.is_success or status in options.answer_statuses:
                return response
            if (
                should_retry(response)
                and retries_taken < self.max_retries
                and may_repeat(options.retryable)
            ):
                reason = f"status {status}"
                delay = self._retry_delay(options, retries_taken, tried, response.headers, reason)
                if delay is not None:
                    yield delay
                retries_taken += 1
                continue
            raise make_status_error(response)

    def _end_stream(self, response: httpx.Response, error: BaseException | None) -> None:
        """Give back the replica of a stream the shell has finished reading.

        Args:
            response: The stream's response, as the plan returned it.
            error: What ended the stream early: a transport error marks the replica
                down, another API error counts a failure; None (or the caller leaving
                the loop) is a success or a drop.
        """
        lease = self._streams.pop(response, None)
        if lease is None:
            return
        if error is None:
            self._pool.release(lease, "ok")
        elif isinstance(error, httpx.TransportError):
            self._pool.release(lease, "down", repr(error))
        elif isinstance(error, DVPError):
            self._pool.release(lease, "failed", repr(error))
        else:
            self._pool.release(lease, "dropped")

    def _retry_delay(
        self,
        options: RequestOptions,
        retries_taken: int,
        tried: set[int],
        headers: httpx.Headers | None,
        why: str,
    ) -> float | None:
        """The delay before the next attempt, logged: None to fail over at once (a
        replica is up and untried), else Retry-After, else the backoff."""
        if options.replica is None and self._pool.has_fresh(tried):
            delay = None
        else:
            delay = parse_retry_after(headers) if headers is not None else None
            if delay is None:
                delay = backoff_delay(retries_taken)
        log.info(
            "%s %s: %s; retry %d of %d %s",
            options.method,
            options.path,
            why,
            retries_taken + 1,
            self.max_retries,
            "on another replica now" if delay is None else f"in {delay:.2f} s",
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


def _outcome(status: int) -> Outcome:
    """What an answer says about its replica (see :data:`dvp_client._replicas.Outcome`)."""
    if status in C.REPLICA_DOWN_STATUSES:
        return "down"
    return "failed" if status >= 500 else "ok"


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
