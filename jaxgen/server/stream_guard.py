"""`StreamGuard`: bounds what one streaming call holds for a client that stops reading.

A client that stops reading its stream (stuck, paused in a debugger, behind a dead proxy) fills
its flow-control window and the transport's buffers; from then on every write to it waits, the
engine's outputs pile up unsent, and its request keeps a decode slot and KV pages for nobody.
The guard gives each write `stall_timeout_s` to complete and watches the tokens waiting unsent;
past either limit it raises `StreamStalled`, and the front end aborts the request (slot and pages
freed at the next step) and ends the call with RESOURCE_EXHAUSTED (HTTP: closes the stream).
Other streams are unaffected: each call has its own guard, and a write that waits blocks only
its own coroutine.

Used by the gRPC servicer and the HTTP app; knows asyncio and engine streams, not transports.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence

from jaxgen.request_stream import RequestStream
from jaxgen.server.front_end import StreamLimits


class StreamStalled(Exception):
    """The client has not read its stream for too long, or too much waits for it unsent; the
    message names the limit."""


class StreamGuard:
    def __init__(self, streams: Sequence[RequestStream], limits: StreamLimits):
        self._streams, self._limits = streams, limits
        self._write: asyncio.Timeout | None = None  # the write in progress, if any
        self._overflow = False

    def check(self) -> None:
        """On every engine wake-up of the call's streams (on the loop, also while a write
        waits): past the buffer limit, ends the write in progress at once."""
        if self._write is not None and \
                sum(s.pending_tokens for s in self._streams) > self._limits.buffer_tokens:
            self._overflow = True
            self._write.reschedule(asyncio.get_running_loop().time())

    async def send(self, write: Awaitable) -> None:
        """Awaits one write to the client; raises StreamStalled (the write cancelled) if it has
        not completed within the stall timeout, or once the tokens waiting unsent pass the
        buffer limit while it waits."""
        try:
            async with asyncio.timeout(self._limits.stall_timeout_s) as self._write:
                await write
        except TimeoutError:
            if self._overflow:
                raise StreamStalled(
                    f"the client read too slowly: more than stream_buffer_tokens="
                    f"{self._limits.buffer_tokens} tokens waited unsent; the request was "
                    f"aborted") from None
            raise StreamStalled(
                f"the client read nothing for stream_stall_timeout="
                f"{self._limits.stall_timeout_s:g}s with output waiting; the request was "
                f"aborted") from None
        finally:
            self._write = None
