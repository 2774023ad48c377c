"""Streamed rollouts: a request's rollouts as events while they are decoded.

The request is checked and prepared exactly as a non-streamed one
(:meth:`RolloutService.prepare`: a bad request still gets its 4xx before any
byte of the stream), and every rollout's engine stream is opened before the
first event (:func:`open_stream`: a full queue is a 429, not a stream). Its
rollouts then run as concurrent engine streams (:meth:`RolloutService.collect`)
whose chunks go, as they arrive, to one queue; every chunk becomes a
``rollout.chunk`` event. When all rollouts have finished, their chunks are
joined by the same :meth:`RolloutService.assemble` as a non-streamed request,
and the ``rollout.summary`` event closes the stream. A failure after the stream
started aborts the other rollouts and is raised to the route (``api/streaming.py``),
which ends the stream with an ``error`` event. The wire format is in
:mod:`dvp_schemas.stream`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from dvp_client.versions import spans_from_versions
from dvp_schemas import (
    RolloutEnd,
    RolloutRequest,
    RolloutStreamChunk,
    RolloutStreamSummary,
    SafeTokenIdsFormat,
)

from ..engines.base import EngineError, RolloutChunk
from .assembly import nan_to_null, wire_safe_ids
from .serving import PreparedRequest, RolloutService, rollout_id

__all__ = ["RolloutStream", "chunk_event", "open_stream", "stream_events"]

logger = logging.getLogger(__name__)


@dataclass
class RolloutStream:
    """A started streamed request: its events, and how to close what they did not reach."""

    events: AsyncIterator[Any]
    close: Callable[[], Awaitable[None]]


async def open_stream(
    service: RolloutService, body: RolloutRequest, request_id: str
) -> RolloutStream:
    """Prepare the request and open every rollout's engine stream.

    Raises:
        ServiceError, EngineError: the request is refused before streaming starts.
    """
    prepared = await service.prepare(body, request_id)
    streams: list[AsyncIterator[RolloutChunk]] = []
    try:
        for job in prepared.jobs:
            rid = rollout_id(prepared.key, job)
            streams.append(service.engine.generate(rid, job.prompt_ids, job.params))
    except BaseException:
        await _close_all(streams)
        raise
    return RolloutStream(
        stream_events(service, prepared, streams), close=lambda: _close_all(streams)
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
        logprobs=nan_to_null(chunk.logprobs) if "logprobs" in fields else None,
        masked_logprobs=chunk.masked_logprobs.astype(np.float64).tolist(),
        safe_logmass=nan_to_null(chunk.safe_logmass) if "safe_logmass" in fields else None,
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
    """The events of a prepared request: chunks as they come, then the summary.

    ``streams``: the jobs' engine streams, opened already (None: opened here).
    Closing the iterator (or cancelling its consumer) cancels every rollout task,
    which aborts the unfinished rollouts in the engine.

    Raises:
        ServiceError, EngineError: a rollout failed after the stream started (the
            other rollouts are aborted).
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
                sets=prepared.sets,
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
    except Exception as exc:  # the route turns it into the stream's error event
        logger.info("request %s: stream failed (%r); rollouts aborted", prepared.key, exc)
        raise
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
