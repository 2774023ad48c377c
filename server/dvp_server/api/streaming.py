"""Streamed rollouts over HTTP: ``POST /v1/rollouts`` with ``"stream": true``.

``service/streaming.py`` makes the events; :class:`EventStreamResponse` sends them
as NDJSON lines (or msgpack maps per Accept) and, when the service raises after
the stream started, ends it with an ``error`` event (the status map of
``errors.py``).

Disconnects: :class:`EventStreamResponse` watches the connection while it
streams; when the client goes away it cancels the stream, which aborts every
unfinished rollout of the request in the engine (the torch engine drops the
rows at its next step).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from dvp_schemas import NDJSON_MEDIA_TYPE, RolloutRequest, RolloutStreamChunk, RolloutStreamError
from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..service.serving import RolloutService
from ..service.streaming import open_stream
from .codecs import MSGPACK_MEDIA_TYPE, pack, wants_msgpack
from .errors import error_info

__all__ = ["EventStreamResponse", "stream_response"]

logger = logging.getLogger(__name__)


async def stream_response(
    service: RolloutService, body: RolloutRequest, request: Request
) -> EventStreamResponse:
    """The streamed response of a rollout request (NDJSON, or msgpack per Accept).

    Raises:
        ServiceError, EngineError: the request is refused before streaming starts.
    """
    stream = await open_stream(service, body, request.state.request_id)
    return EventStreamResponse(stream.events, msgpack=wants_msgpack(request), cleanup=stream.close)


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
        except Exception as exc:  # the status line is sent: the error goes into the stream
            yield self.encode(RolloutStreamError(error=error_info(exc)))
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
