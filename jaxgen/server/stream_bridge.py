"""Engine outputs into asyncio without a thread per stream.

The engine loop thread puts each `RequestOutput` on the request's thread-safe `RequestStream`;
the stream's wake-up callback hands the stream's `Event.set` to the loop's `LoopWaker`, and the
coroutine drains everything that is waiting. Any number of streams cost no threads.

`LoopWaker` coalesces: an engine step puts one output on each of its running requests' streams
(64 at once with 64 slots), and a `call_soon_threadsafe` for each would cost the engine thread a
self-pipe write per stream and the event loop a handle per stream. The waker queues the
callbacks and schedules one flush on the loop for all that arrive before the flush runs: one
write and one handle per burst (as vLLM's front end runs one output handler per engine step).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Callable

from jaxgen.request_stream import RequestOutput, RequestStream

log = logging.getLogger(__name__)


class LoopWaker:
    """Runs callbacks handed over from other threads on one event loop, batched per burst."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[Callable[[], None]] = []

    def wake(self, callback: Callable[[], None]) -> None:
        """Runs `callback` on the loop soon. Thread-safe and non-blocking; dropped silently once
        the loop is closed (the server is gone, nobody is listening)."""
        with self._lock:
            self._pending.append(callback)
            if len(self._pending) > 1:  # a flush is already scheduled and will see it
                return
        try:
            self._loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop is closed
            with self._lock:
                self._pending.clear()

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for callback in pending:
            try:
                callback()
            except Exception:  # one stream's failure must not starve the others of wake-ups
                log.exception("stream wake-up callback failed")


_wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWaker] = \
    weakref.WeakKeyDictionary()
_wakers_lock = threading.Lock()


def waker(loop: asyncio.AbstractEventLoop) -> LoopWaker:
    """The one `LoopWaker` of `loop`."""
    with _wakers_lock:
        w = _wakers.get(loop)
        if w is None:
            w = _wakers[loop] = LoopWaker(loop)
        return w


def wake_on(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> Callable[[], None]:
    """A stream callback (run on the engine thread) that runs `callback` on `loop`."""
    w = waker(loop)
    return lambda: w.wake(callback)


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


async def merged_outputs(streams, on_wake: Callable[[], None] | None = None
                         ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(position of the stream in `streams`, output) for every output of `streams` — each
    stream's in order — until every stream has finished: the choices of one request.
    `on_wake` runs on the loop at every wake-up, also while the consumer is busy elsewhere (a
    stream guard watching what its client has not read)."""
    ready = asyncio.Event()

    def woken():
        ready.set()
        if on_wake is not None:
            on_wake()
    wake = wake_on(asyncio.get_running_loop(), woken)
    for stream in streams:
        stream.notify(wake)
    running = set(range(len(streams)))
    while running:
        await ready.wait()
        ready.clear()  # before draining: a put after the drain sets it again
        for i in sorted(running):
            for out in drain(streams[i]):
                yield i, out
                if out.finished:
                    running.discard(i)
                    break
