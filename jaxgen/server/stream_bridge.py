"""Engine outputs into asyncio without a thread per stream.

The engine loop thread puts each `RequestOutput` on the request's thread-safe `RequestStream`;
the stream's wake-up callback schedules `Event.set` on the event loop (`call_soon_threadsafe`),
and the coroutine drains everything that is waiting. Any number of streams cost no threads.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable

from jaxgen.request_stream import RequestOutput, RequestStream


def wake_on(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> Callable[[], None]:
    """A stream callback (run on the engine thread) that runs `callback` on `loop`."""
    def wake() -> None:
        try:
            loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass
    return wake


def drain(stream: RequestStream) -> list[RequestOutput]:
    """Every output waiting on `stream`, oldest first."""
    outs = []
    while True:
        try:
            outs.append(stream.get_nowait())
        except queue.Empty:
            return outs


async def outputs(stream: RequestStream) -> AsyncIterator[RequestOutput]:
    """The stream's outputs, as the engine produces them, ending after the final one."""
    ready = asyncio.Event()
    stream.notify(wake_on(asyncio.get_running_loop(), ready.set))
    while True:
        await ready.wait()
        ready.clear()  # before draining: a put after the drain sets it again
        for out in drain(stream):
            yield out
            if out.finished:
                return
