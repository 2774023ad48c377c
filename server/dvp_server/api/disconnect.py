"""Cancel a request's work when its HTTP client goes away (nginx's 499)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

from ..errors import ServiceError

__all__ = ["ClientDisconnected", "run_until_disconnect"]

T = TypeVar("T")


class ClientDisconnected(ServiceError):
    """The HTTP client went away before its rollouts were done (nginx's 499)."""

    def __init__(self) -> None:
        super().__init__(499, "client_closed_request", "client closed the connection")


async def _listen_for_disconnect(request: Request) -> None:
    """Return when the HTTP client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``; cancel it if the HTTP client disconnects first.

    Raises:
        ClientDisconnected: the client went away (``work`` was cancelled, which
            aborts its rollouts in the engine).
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_listen_for_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()
