"""``AsyncClient``: the asynchronous shell over the core in :mod:`dvp_client._base`.

The same API as :class:`dvp_client.Client`; it differs only in how it sends,
sleeps and closes.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx
from dvp_schemas import HealthResponse, ModelList, PruningRule, ScoreResponse, WeightsUpdateResponse
from dvp_schemas.weights import InflightPolicy

from ._base import BaseClient, Plan, _json
from ._constants import DEFAULT_MAX_RETRIES
from ._options import BaseURLInput, RequestOptions, ScoreInput, request_options
from ._streaming import EventDecoder, StreamEvent
from ._types import NOT_GIVEN, Headers, NotGivenOr, PromptInput, TimeoutTypes
from .batch import RolloutBatch

__all__ = ["AsyncClient"]


class AsyncClient(BaseClient[httpx.AsyncClient]):
    """Asynchronous client of a dvp-serve server; the same API as :class:`Client`.

    Example::

        async with AsyncClient("http://127.0.0.1:8000") as c:
            batch = await c.rollouts(["What is 7*8?"], n=4, max_tokens=64)

    Args: as :class:`Client`, with ``http_client`` an ``httpx.AsyncClient``.
    """

    def __init__(
        self,
        base_url: BaseURLInput = None,
        *,
        api_key: str | None = None,
        timeout: NotGivenOr[TimeoutTypes] = NOT_GIVEN,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.AsyncClient | None = None,
        msgpack: bool = False,
    ) -> None:
        super().__init__(
            base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            http_client=http_client if http_client is not None else httpx.AsyncClient(),
            owns_http_client=http_client is None,
            msgpack=msgpack,
        )

    # -- the three things that differ from Client ----------------------------------

    async def _send(self, request: httpx.Request, stream: bool = False) -> httpx.Response:
        response = await self._client.send(request, stream=stream)
        if stream and not response.is_success:
            await response.aread()  # an error body is parsed (and the connection released)
        return response

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def close(self) -> None:
        """Close the underlying httpx client if this object created it."""
        if self._owns_http_client:
            await self._client.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _run(self, plan: Plan, stream: bool = False) -> httpx.Response:
        """Drive a retry plan: send its requests, sleep its delays (see :meth:`Client._run`)."""
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
                        reply = await self._send(step, stream)
                    except httpx.TransportError as err:
                        error = err
                else:
                    await self._sleep(step)
        finally:
            plan.close()  # cancelled mid-attempt: the plan gives its replica back

    # -- API ---------------------------------------------------------------------

    async def rollouts(
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
        """Sample ``n`` rollouts per prompt; see :meth:`Client.rollouts`."""
        options = self._rollouts_options(locals(), stream=False)
        return self._parse(await self._run(self._plan(options)), RolloutBatch)

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
    ) -> AsyncIterator[StreamEvent]:
        """Sample rollouts, receiving them as they decode; see :meth:`Client.stream_rollouts`.

        Example::

            async for event in client.stream_rollouts(["Hi"], n=4, max_tokens=64):
                ...
        """
        options = self._rollouts_options(locals(), stream=True)
        return self._events(options)

    async def _events(self, options: RequestOptions) -> AsyncIterator[StreamEvent]:
        response = await self._run(self._plan(options), stream=True)
        decoder = EventDecoder(response)
        error: BaseException | None = None
        try:
            async for data in response.aiter_bytes():
                for event in decoder.feed(data):
                    yield event
            for event in decoder.finish():
                yield event
        except BaseException as err:  # GeneratorExit too: the caller left the loop
            error = err
            raise
        finally:
            await response.aclose()
            self._end_stream(response, error)

    async def score(
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
        """``POST /v1/score``; see :meth:`Client.score`."""
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
        return self._parse(await self._run(self._plan(options)), ScoreResponse)

    async def update_weights(
        self,
        path: str | os.PathLike[str],
        *,
        on_inflight: InflightPolicy | None = None,
        drain_timeout_s: float | None = None,
        policy_version: int | None = None,
        timeout: NotGivenOr[TimeoutTypes] = NOT_GIVEN,
        extra_headers: Headers | None = None,
    ) -> list[WeightsUpdateResponse]:
        """``POST /v1/weights`` to every replica, in turn; see :meth:`Client.update_weights`."""
        options = self._weights_options(
            path,
            on_inflight=on_inflight,
            drain_timeout_s=drain_timeout_s,
            policy_version=policy_version,
            timeout=timeout,
            extra_headers=extra_headers,
        )
        return [self._parse(await self._run(self._plan(o)), WeightsUpdateResponse) for o in options]

    async def health(self, *, timeout: NotGivenOr[TimeoutTypes] = NOT_GIVEN) -> HealthResponse:
        """``GET /health``; see :meth:`Client.health`."""
        return self._parse_health(await self._run(self._plan(self._health_options(timeout))))

    async def models(self, *, timeout: NotGivenOr[TimeoutTypes] = NOT_GIVEN) -> ModelList:
        """``GET /v1/models``; see :meth:`Client.models`."""
        options = RequestOptions("GET", "/v1/models", timeout=timeout)
        return self._parse(await self._run(self._plan(options)), ModelList)

    async def request(
        self,
        method: str,
        path: str,
        json: object = None,
        *,
        timeout: NotGivenOr[TimeoutTypes] = NOT_GIVEN,
        extra_headers: Headers | None = None,
        safe_to_retry: bool | None = None,
    ) -> Any:
        """Call any route; see :meth:`Client.request`."""
        options = request_options(method, path, json, timeout, extra_headers, safe_to_retry)
        return _json(await self._run(self._plan(options)))
