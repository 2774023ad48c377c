"""Streamed rollouts: ``POST /v1/rollouts`` with ``"stream": true``.

The request is checked and prepared exactly as a non-streamed one
(:meth:`RolloutService.prepare`: a bad request still gets its 4xx before any
byte of the stream), then its rollouts are fanned out as concurrent engine
streams (:meth:`RolloutService.collect`) whose chunks go, as they arrive, to
one queue; every chunk becomes a ``rollout.chunk`` line. When all rollouts
have finished, their chunks are joined by the same :meth:`RolloutService.assemble`
as a non-streamed request, and the ``rollout.summary`` line closes the stream.
A failure after the stream started (the engine failed a rollout) aborts the
other rollouts and ends the stream with an ``error`` line. The wire format is
in :mod:`dvp_schemas.stream`.

Disconnects: :class:`EventStreamResponse` watches the connection while it
streams; when the client goes away it cancels the stream, which aborts every
unfinished rollout of the request in the engine (the torch engine drops the
rows at its next step).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
from dvp_client.versions import spans_from_versions
from dvp_schemas import (
    NDJSON_MEDIA_TYPE,
    ErrorInfo,
    RolloutEnd,
    RolloutRequest,
    RolloutStreamChunk,
    RolloutStreamError,
    RolloutStreamSummary,
    SafeTokenIdsFormat,
)
from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..engines.base import EngineError, RolloutChunk
from ..errors import ServiceError
from ..service.assembly import wire_safe_ids
from ..service.serving import PreparedRequest, RolloutService, rollout_id
from .codecs import MSGPACK_MEDIA_TYPE, pack, wants_msgpack

__all__ = ["EventStreamResponse", "stream_events", "stream_response"]

logger = logging.getLogger(__name__)


async def stream_response(
    service: RolloutService, body: RolloutRequest, request: Request
) -> EventStreamResponse:
    """The streamed response of a rollout request (NDJSON, or msgpack per Accept).

    Every rollout's engine stream is opened before the response starts, so a
    server whose queue is full answers 429 (with Retry-After) instead of a stream.

    Raises:
        ServiceError, EngineError: the request is refused before streaming starts.
    """
    prepared = await service.prepare(body, request.state.request_id)
    streams: list[AsyncIterator[RolloutChunk]] = []
    try:
        for job in prepared.jobs:
            rid = rollout_id(prepared.key, job)
            streams.append(service.engine.generate(rid, job.prompt_ids, job.params))
    except BaseException:
        await _close_all(streams)
        raise
    return EventStreamResponse(
        stream_events(service, prepared, streams),
        msgpack=wants_msgpack(request),
        cleanup=lambda: _close_all(streams),
    )


async def _close_all(streams: list[AsyncIterator[RolloutChunk]]) -> None:
    """Close engine streams (idempotent: a finished or closed one ignores it)."""
    for stream in streams:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


def chunk_event(
    job_prompt: int,
    job_sample: int,
    start: int,
    chunk: RolloutChunk,
    fields: set[str],
    vocab_size: int,
    safe_format: SafeTokenIdsFormat = "list",
) -> RolloutStreamChunk:
    """One engine chunk as a ``rollout.chunk`` line (NaN -> null, safe sets in
    ``safe_format`` with the whole-vocabulary marker, as ``assembly.wire_safe_ids``).

    Raises:
        EngineError: the chunk's safe sets break the engine contract.
    """

    def floats(a: np.ndarray) -> list[float | None]:
        return [None if math.isnan(x) else x for x in a.astype(np.float64).tolist()]

    safe_ids = None
    if chunk.safe_ids is not None and chunk.safe_offsets is not None:
        try:
            safe_ids = wire_safe_ids(
                chunk.safe_offsets.astype(np.int64),
                chunk.safe_ids.astype(np.int64),
                chunk.safe_sizes.astype(np.int64),
                vocab_size,
                safe_format,
            )
        except ValueError as exc:
            raise EngineError(f"rollout chunk ({job_prompt}, {job_sample}): {exc}") from exc
    outside = None
    if chunk.outside_safe_set is not None:
        outside = (np.flatnonzero(chunk.outside_safe_set) + start).tolist()
    return RolloutStreamChunk(
        prompt_index=job_prompt,
        sample_index=job_sample,
        start=start,
        token_ids=chunk.token_ids.astype(np.int64).tolist(),
        logprobs=floats(chunk.logprobs) if "logprobs" in fields else None,
        masked_logprobs=chunk.masked_logprobs.astype(np.float64).tolist(),
        safe_logmass=floats(chunk.safe_logmass) if "safe_logmass" in fields else None,
        safe_sizes=chunk.safe_sizes.astype(np.int64).tolist(),
        safe_token_ids=safe_ids,
        outside_safe_set=outside,
        policy_version=chunk.policy_version,
        version_spans=spans_from_versions(*chunk.versions(), start=start),
        finish_reason=chunk.finish_reason,
        stop_reason=chunk.stop_reason,
    )


async def stream_events(
    service: RolloutService,
    prepared: PreparedRequest,
    streams: list[AsyncIterator[RolloutChunk]] | None = None,
) -> AsyncIterator[Any]:
    """The events of a prepared request: chunks as they come, then the summary (or an error).

    ``streams``: the jobs' engine streams, opened already (None: opened here).
    Closing the iterator (or cancelling its consumer) cancels every rollout task,
    which aborts the unfinished rollouts in the engine.
    """
    jobs = prepared.jobs
    queue: asyncio.Queue[tuple[str, int, Any]] = asyncio.Queue()
    fields: set[str] = set(service.engine.info.capabilities.fields)

    async def run(i: int) -> None:
        try:
            chunks = await service.collect(
                rollout_id(prepared.key, jobs[i]),
                jobs[i],
                on_chunk=lambda c: queue.put_nowait(("chunk", i, c)),
                stream=streams[i] if streams is not None else None,
            )
        except Exception as exc:
            queue.put_nowait(("error", i, exc))
        else:
            queue.put_nowait(("done", i, chunks))

    tasks = [asyncio.ensure_future(run(i)) for i in range(len(jobs))]
    starts = [0] * len(jobs)
    results: list[list[RolloutChunk]] = [[] for _ in jobs]
    remaining = len(jobs)
    try:
        while remaining:
            kind, i, payload = await queue.get()
            if kind == "chunk":
                job = jobs[i]
                yield chunk_event(
                    job.prompt_index,
                    job.sample_index,
                    starts[i],
                    payload,
                    fields,
                    service.engine.info.vocab_size,
                    prepared.request.safe_token_ids_format,
                )
                starts[i] += len(payload.token_ids)
            elif kind == "done":
                results[i], remaining = payload, remaining - 1
            else:
                raise payload
        rollouts = [service.assemble(prepared, j, c) for j, c in zip(jobs, results, strict=True)]
        yield _summary(service, prepared, rollouts)
    except Exception as exc:  # the status line is sent: the error goes into the stream
        logger.info("request %s: stream failed (%r); rollouts aborted", prepared.key, exc)
        yield RolloutStreamError(error=_error_info(exc))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _summary(
    service: RolloutService, prepared: PreparedRequest, rollouts: list[Any]
) -> RolloutStreamSummary:
    full = service.response(prepared, rollouts)
    ends = [
        RolloutEnd(
            prompt_index=r.prompt_index,
            sample_index=r.sample_index,
            prompt_token_ids=r.prompt_token_ids,
            num_tokens=r.num_tokens,
            text=r.text,
            finish_reason=r.finish_reason,
            stop_reason=r.stop_reason,
            policy_version=r.policy_version,
            seed=r.seed,
        )
        for r in full.rollouts
    ]
    return RolloutStreamSummary(
        id=full.id,
        model=full.model,
        engine=full.engine,
        temperature=full.temperature,
        pruning=full.pruning,
        policy_version=full.policy_version,
        rollouts=ends,
        usage=full.usage,
    )


def _error_info(exc: BaseException) -> ErrorInfo:
    """The error body of a failure inside a stream (the status map of ``errors.py``)."""
    if isinstance(exc, ServiceError):
        return ErrorInfo(type=exc.type, message=exc.message, param=exc.param, code=exc.status)
    if isinstance(exc, EngineError):
        return ErrorInfo(
            type="engine_error", message=f"engine error (retryable): {exc}", param=None, code=503
        )
    logger.error("unexpected error in a rollout stream", exc_info=exc)
    return ErrorInfo(
        type="internal_error",
        message="internal server error (logged on the server)",
        param=None,
        code=500,
    )


class EventStreamResponse(StreamingResponse):
    """Stream pydantic events as NDJSON lines (or concatenated msgpack maps).

    While it streams it also listens for ``http.disconnect``; a client that goes
    away cancels the event iterator at once (not at the next write), so its
    rollouts are aborted within one engine step.
    """

    def __init__(
        self,
        events: AsyncIterator[BaseModel],
        *,
        msgpack: bool = False,
        cleanup: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.events = events
        self.msgpack = msgpack
        self.cleanup = cleanup
        media_type = MSGPACK_MEDIA_TYPE if msgpack else NDJSON_MEDIA_TYPE
        super().__init__(self._encoded(), media_type=media_type)

    def encode(self, event: BaseModel) -> bytes:
        """One event's bytes: a JSON line, or a msgpack map (chunks with float32 floats)."""
        if not self.msgpack:
            return event.model_dump_json().encode() + b"\n"
        data = event.model_dump()
        f32 = data.keys() if isinstance(event, RolloutStreamChunk) else ()
        return pack(data, float32_keys=f32)

    async def _encoded(self) -> AsyncIterator[bytes]:
        try:
            async for event in self.events:
                yield self.encode(event)
        finally:
            await self.events.aclose()  # type: ignore[attr-defined]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def body() -> None:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        body_task = asyncio.ensure_future(body())
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({body_task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not body_task.done():
                body_task.cancel()
                logger.info("rollout stream: client disconnected, stream cancelled")
            await asyncio.gather(body_task, watch, return_exceptions=True)
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            if self.cleanup is not None:  # e.g. engine streams the events never reached
                await self.cleanup()
        if not body_task.cancelled() and (exc := body_task.exception()) is not None:
            raise exc
