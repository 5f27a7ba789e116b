"""Non-streaming requests end when their client leaves.

A streaming response notices a closed connection on its next write; a non-streaming one writes
nothing until the whole completion is done, so without a watcher a client that gives up leaves
its request generating (and holding KV blocks) to the end. `until_disconnected` runs the
response's coroutine next to a watch on the connection (`receive()` answers `http.disconnect`
when the client closes it) and cancels the work the moment the client is gone: the cluster
iterator's `finally` then aborts the request on its workers, which free its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request, Response

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client closed the connection"


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T | Response:
    """`work`'s result, or a 499 (that nobody reads) once the client has disconnected."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
    if task.cancelled():
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return task.result()


async def _disconnected(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
