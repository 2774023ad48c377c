"""``Client`` and ``AsyncClient``: thin shells over the core in :mod:`dvp_client._base`.

They differ only in how they send, sleep and close; URLs, headers, bodies,
retries and backoff live in the core. ``AsyncClient`` lives in
:mod:`dvp_client._async_client` and is re-exported here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx
from dvp_schemas import HealthResponse, ModelList, PruningRule, ScoreResponse, WeightsUpdateResponse
from dvp_schemas.weights import InflightPolicy

from ._async_client import AsyncClient
from ._base import BaseClient, Plan, _json
from ._constants import DEFAULT_MAX_RETRIES
from ._options import BaseURLInput, RequestOptions, ScoreInput, request_options
from ._streaming import EventDecoder, StreamEvent
from ._types import NOT_GIVEN, Headers, NotGivenOr, PromptInput, TimeoutTypes
from .batch import RolloutBatch

__all__ = ["AsyncClient", "Client"]


class Client(BaseClient[httpx.Client]):
    """Synchronous client of a dvp-serve server.

    Example::

        from dvp_client import Client

        with Client("http://127.0.0.1:8000") as c:
            batch = c.rollouts(["What is 7*8?"], n=4, max_tokens=64, pruning={"min_p": 1e-3})
        r = batch.rollouts[0]
        r.token_ids, r.masked_logprobs, r.safe_logmass, r.safe_sizes, r.policy_version

    Args:
        base_url: Server URL, e.g. ``"http://127.0.0.1:8000"``; None reads
            ``DVP_BASE_URL``, else ``http://127.0.0.1:8000``. A list of URLs: replicas
            of the same model. Each attempt goes to the replica with the fewest
            attempts in flight (ties in turn); a failed attempt moves to another
            replica when repeating it is safe (see :meth:`rollouts`; a connect error
            always is), counting against ``max_retries``; a replica that failed
            (transport error, 502/503/504) sits out a cooldown. See
            :meth:`replica_stats`.
        api_key: Sent as ``Authorization: Bearer <key>``; None reads ``DVP_API_KEY``;
            no header when neither is set.
        timeout: Default timeout of every call (seconds, an ``httpx.Timeout``, or
            None for none). NOT_GIVEN: 600 s, 5 s to connect (or ``http_client``'s
            own timeout when it set one).
        max_retries: Retries after the first attempt, for retryable failures.
        http_client: An ``httpx.Client`` to send with (proxies, limits, or an
            ``httpx.MockTransport`` in tests). The caller keeps ownership: ``close()``
            only closes a client this object created.
        msgpack: Send request bodies and ask for responses as msgpack
            (``application/msgpack``; needs the ``msgpack`` package): the same
            models, about half the bytes of JSON for rollouts. Error bodies stay JSON.
    """

    def __init__(
        self,
        base_url: BaseURLInput = None,
        *,
        api_key: str | None = None,
        timeout: NotGivenOr[TimeoutTypes] = NOT_GIVEN,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.Client | None = None,
        msgpack: bool = False,
    ) -> None:
        super().__init__(
            base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            http_client=http_client if http_client is not None else httpx.Client(),
            owns_http_client=http_client is None,
            msgpack=msgpack,
        )

    # -- the three things that differ from AsyncClient --------------------------------

    def _send(self, request: httpx.Request, stream: bool = False) -> httpx.Response:
        response = self._client.send(request, stream=stream)
        if stream and not response.is_success:
            response.read()  # an error body is parsed (and the connection released)
        return response

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def close(self) -> None:
        """Close the underlying httpx client if this object created it."""
        if self._owns_http_client:
            self._client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self, plan: Plan, stream: bool = False) -> httpx.Response:
        """Drive a retry plan: send its requests, sleep its delays.

        ``stream``: the final response's body is left unread (the caller closes it).
        """
        reply: httpx.Response | None = None
        error: httpx.TransportError | None = None
        try:
            while True:
                try:
                    step = plan.send(reply) if error is None else plan.throw(error)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
                reply, error = None, None
                if isinstance(step, httpx.Request):
                    try:
                        reply = self._send(step, stream)
                    except httpx.TransportError as err:
                        error = err
                else:
                    self._sleep(step)
        finally:
            plan.close()  # interrupted mid-attempt: the plan gives its replica back

    # -- API ---------------------------------------------------------------------

    def rollouts(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        *,
        n: int = 1,
        temperature: NotGivenOr[float] = NOT_GIVEN,
        max_tokens: NotGivenOr[int] = NOT_GIVEN,
        stop: NotGivenOr[str | Sequence[str] | None] = NOT_GIVEN,
        stop_token_ids: NotGivenOr[Sequence[int] | None] = NOT_GIVEN,
        seed: NotGivenOr[int | None] = NOT_GIVEN,
        ignore_eos: NotGivenOr[bool] = NOT_GIVEN,
        pruning: PruningRule | Mapping[str, object] | None = None,
        return_safe_token_ids: bool = False,
        return_text: bool = True,
        model: str | None = None,
        timeout: NotGivenOr[TimeoutTypes] = NOT_GIVEN,
        extra_headers: Headers | None = None,
    ) -> RolloutBatch:
        """Sample ``n`` rollouts per prompt from pi_S, with per-step DVP metadata.

        The arguments are validated client side (as a
        :class:`dvp_schemas.RolloutRequest`) before anything is sent. Sampling
        arguments left NOT_GIVEN are not sent, so the server's defaults apply.

        Retries: the request is retried (connection errors, 408, 409, 429, 5xx; on
        another replica when there is one) only because it is safe to repeat. With
        ``seed`` NOT_GIVEN the client draws a 63-bit seed once, before the first
        attempt, and sends it on every attempt, so a retry reproduces the samples
        the lost attempt drew (the seed of each sample comes back in
        ``Rollout.seed``; on the same weights, up to the engine's batch-dependent
        rounding). ``seed=None`` sends an unseeded request, which is then retried
        only when it never reached a server (a connect error).

        Args:
            prompts: One text prompt, or a list of prompts: text, token ids, or chat
                messages (``[{"role": "user", "content": "..."}]``).
            n: Samples per prompt.
            temperature: Softmax temperature T; 0 is greedy.
            max_tokens: New tokens per rollout, at most.
            stop: Stop string(s); None for none.
            stop_token_ids: Extra token ids that end a rollout.
            seed: See above.
            ignore_eos: Keep generating past end-of-sequence.
            pruning: The safe-vocabulary rule (:class:`PruningRule` or a dict such as
                ``{"min_p": 1e-3}``); None: the server's default.
            return_safe_token_ids: Also return every step's safe set (CSR).
            return_text: Return the decoded completion text.
            model: Model id the server must be serving; None skips the check.
            timeout: This call's timeout; NOT_GIVEN uses the client's.
            extra_headers: Headers added to (and overriding) the client's.

        Returns:
            The rollouts, ordered by (prompt_index, sample_index).

        Raises:
            pydantic.ValidationError: An argument is invalid (nothing was sent).
            APIStatusError: The server refused (subclass by status; ``param`` names
                the field on a 422).
            APIConnectionError: No response after the retries.
        """
        options = self._rollouts_options(locals(), stream=False)
        return self._parse(self._run(self._plan(options)), RolloutBatch)

    def stream_rollouts(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        *,
        n: int = 1,
        temperature: NotGivenOr[float] = NOT_GIVEN,
        max_tokens: NotGivenOr[int] = NOT_GIVEN,
        stop: NotGivenOr[str | Sequence[str] | None] = NOT_GIVEN,
        stop_token_ids: NotGivenOr[Sequence[int] | None] = NOT_GIVEN,
        seed: NotGivenOr[int | None] = NOT_GIVEN,
        ignore_eos: NotGivenOr[bool] = NOT_GIVEN,
        pruning: PruningRule | Mapping[str, object] | None = None,
        return_safe_token_ids: bool = False,
        return_text: bool = True,
        model: str | None = None,
        timeout: NotGivenOr[TimeoutTypes] = NOT_GIVEN,
        extra_headers: Headers | None = None,
    ) -> Iterator[StreamEvent]:
        """Sample rollouts as :meth:`rollouts` does, receiving them as they decode.

        Iterate the result: a :class:`dvp_schemas.RolloutStreamChunk` per engine
        chunk (k steps of one rollout; rollouts interleave, each in order), then one
        :class:`dvp_schemas.RolloutStreamSummary` (texts, finish reasons, usage).
        :func:`dvp_client.join_rollout_stream` joins them into the
        :class:`RolloutBatch` that :meth:`rollouts` returns. Arguments are validated
        now; the request is sent at the first ``next()``. Leaving the loop early
        (``break``, an exception) closes the connection, and the server aborts the
        request's unfinished rollouts. Only connecting is retried (or failed over to
        another replica): once the stream has begun, a failure raises.

        Example::

            for event in client.stream_rollouts(["Hi"], n=4, max_tokens=64):
                if event.object == "rollout.chunk":
                    print(event.sample_index, event.token_ids)

        Raises:
            pydantic.ValidationError: An argument is invalid (nothing was sent).
            APIStatusError: The server refused the request (before streaming).
            APIStreamError: The server failed after the stream began.
            APIResponseValidationError: The stream ended before its summary.
        """
        options = self._rollouts_options(locals(), stream=True)
        return self._events(options)

    def _events(self, options: RequestOptions) -> Iterator[StreamEvent]:
        response = self._run(self._plan(options), stream=True)
        decoder = EventDecoder(response)
        error: BaseException | None = None
        try:
            for data in response.iter_bytes():
                yield from decoder.feed(data)
            yield from decoder.finish()
        except BaseException as err:  # GeneratorExit too: the caller left the loop
            error = err
            raise
        finally:
            response.close()
            self._end_stream(response, error)

    def score(
        self,
        sequences: Sequence[ScoreInput],
        *,
        temperature: float = 1.0,
        pruning: PruningRule | Mapping[str, object] | None = None,
        return_safe_token_ids: bool = False,
        top_logprobs: int = 0,
        model: str | None = None,
        timeout: NotGivenOr[TimeoutTypes] = NOT_GIVEN,
        extra_headers: Headers | None = None,
    ) -> ScoreResponse:
        """``POST /v1/score``: teacher-forced log-probs of given tokens under the rule.

        The server runs its own model over each prompt + completion and returns, per
        completion token, ``logprobs`` (full), ``masked_logprobs`` (null where the
        token is outside its safe set, see ``in_safe_set``), ``safe_logmass``,
        ``safe_sizes`` and, when asked, the safe sets and the top-k tokens. Retried
        on retryable failures (scoring has no side effect).

        Args:
            sequences: ``(prompt_ids, completion_ids)`` pairs (or ScoreSequence dicts).
            temperature: Softmax temperature T; 0 is greedy.
            pruning: The rule (as in :meth:`rollouts`); None: no pruning.
            return_safe_token_ids: Also return every step's safe set (CSR).
            top_logprobs: Also return the k most probable tokens per step (k <= 20).
            model: Model id the server must be serving; None skips the check.
            timeout: This call's timeout; NOT_GIVEN uses the client's.
            extra_headers: Headers added to (and overriding) the client's.

        Raises:
            pydantic.ValidationError: An argument is invalid (nothing was sent).
            APIStatusError: The server refused (501 when its engine cannot score).
        """
        options = self._score_options(
            sequences,
            temperature=temperature,
            pruning=pruning,
            return_safe_token_ids=return_safe_token_ids,
            top_logprobs=top_logprobs,
            model=model,
            timeout=timeout,
            extra_headers=extra_headers,
        )
        return self._parse(self._run(self._plan(options)), ScoreResponse)

    def update_weights(
        self,
        path: str | os.PathLike[str],
        *,
        on_inflight: InflightPolicy | None = None,
        drain_timeout_s: float | None = None,
        policy_version: int | None = None,
        timeout: NotGivenOr[TimeoutTypes] = NOT_GIVEN,
        extra_headers: Headers | None = None,
    ) -> list[WeightsUpdateResponse]:
        """``POST /v1/weights``: load new policy weights into every replica, in turn.

        Each server must have been started with ``--weights-root`` above ``path``.
        Not retried once the request may have reached a server (a second update
        would bump ``policy_version`` again); connect errors are retried. An update
        that fails on one replica raises, and the replicas before it keep the new
        weights (the exception's ``request.url`` names the replica).

        Args:
            path: A .safetensors file, or a directory of them, under the server's
                weights root (relative to it, or absolute inside it).
            on_inflight: ``"drain"`` waits for in-flight rollouts, ``"abort"`` ends
                them, ``"keep"`` continues them with the new weights (async RL: their
                tokens carry per-token versions), ``"recompute"`` also prefills their
                context again first; None: the server's policy.
            drain_timeout_s: Longest wait for in-flight rollouts (409 past it).
            policy_version: The version the new weights are served as (above the
                served one); None: the served one plus one. Against a Ray Serve
                proxy (one URL) the call is a fleet update: it returns once every
                replica serves this version (``replicas`` in the response), else
                raises with the replicas that did not (``dvp_server.deploy``).
            timeout: This call's timeout; NOT_GIVEN uses the client's.
            extra_headers: Headers added to (and overriding) the client's.

        Returns:
            One response per replica, in the order of the client's URLs (the new
            ``policy_version``, what happened to in-flight rollouts, timings).

        Raises:
            pydantic.ValidationError: An argument is invalid (nothing was sent).
            APIStatusError: A server refused (403 outside the weights root, 422 a
                tensor that does not match, 409 drain timeout, 501 engine cannot).
        """
        options = self._weights_options(
            path,
            on_inflight=on_inflight,
            drain_timeout_s=drain_timeout_s,
            policy_version=policy_version,
            timeout=timeout,
            extra_headers=extra_headers,
        )
        return [self._parse(self._run(self._plan(o)), WeightsUpdateResponse) for o in options]

    def health(self, *, timeout: NotGivenOr[TimeoutTypes] = NOT_GIVEN) -> HealthResponse:
        """``GET /health``: whether the server and its engine are up.

        A server that is starting, degraded or dead answers 503 with a health body;
        that answer is returned (``status != "ok"``), not retried or raised, so a
        readiness loop can poll it. Connection errors still raise.
        """
        return self._parse_health(self._run(self._plan(self._health_options(timeout))))

    def models(self, *, timeout: NotGivenOr[TimeoutTypes] = NOT_GIVEN) -> ModelList:
        """``GET /v1/models``: the served model, its engine and the fields it returns."""
        options = RequestOptions("GET", "/v1/models", timeout=timeout)
        return self._parse(self._run(self._plan(options)), ModelList)

    def request(
        self,
        method: str,
        path: str,
        json: object = None,
        *,
        timeout: NotGivenOr[TimeoutTypes] = NOT_GIVEN,
        extra_headers: Headers | None = None,
        safe_to_retry: bool | None = None,
    ) -> Any:
        """Call any route with the client's URL, auth, timeout and retries.

        Args:
            method: HTTP method.
            path: Path under the base URL.
            json: JSON body, or None.
            timeout: This call's timeout; NOT_GIVEN uses the client's.
            extra_headers: Headers added to (and overriding) the client's.
            safe_to_retry: Whether retrying is safe; None: only for idempotent methods
                (GET, HEAD, OPTIONS, PUT, DELETE), never for a POST.

        Returns:
            The decoded JSON body (None when the body is empty).
        """
        options = request_options(method, path, json, timeout, extra_headers, safe_to_retry)
        return _json(self._run(self._plan(options)))
