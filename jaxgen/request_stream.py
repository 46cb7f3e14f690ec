"""What a caller gets back from the engine: a stream of `RequestOutput`s ending in one final
output with a finish reason and usage (the scheduler's `Usage`). Thread-safe: the engine loop
writes, any thread reads. A reader that must not block a thread (an asyncio server) registers a
wake-up callback with `notify` and drains with `get_nowait`."""

from __future__ import annotations

import dataclasses
import queue
from collections.abc import Callable

from jaxgen.scheduler.events import DEADLINE_EXCEEDED, SHED, Usage
from jaxgen.scheduler.samples import TokenLogprobs

# The detail of an "error" that the loss of the engine caused (it restarted or cannot, or a
# process of a multi-process engine was lost) starts with this: nothing in the request was
# wrong, so front ends answer UNAVAILABLE / 503 (retry).
ENGINE_UNAVAILABLE = "engine unavailable"


def outcome(finish_reason: str | None, detail: str) -> str | None:
    """ok (stop/length), deadline_exceeded, shed (overload: the queue was full or the wait too
    long; RESOURCE_EXHAUSTED), aborted (cancelled by the client or an abort), unavailable (the
    engine was lost under it; retryable), error; None until the final output."""
    if finish_reason in ("stop", "length"):
        return "ok"
    if finish_reason == "abort":
        if detail.startswith(DEADLINE_EXCEEDED):
            return "deadline_exceeded"
        return "shed" if detail.startswith(SHED) else "aborted"
    if finish_reason is None:
        return None
    return "unavailable" if detail.startswith(ENGINE_UNAVAILABLE) else "error"


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    request_id: str
    token_ids: tuple[int, ...]  # new tokens since the previous output
    text: str  # new complete text since the previous output
    logprobs: tuple[TokenLogprobs, ...] | None = None
    finish_reason: str | None = None  # None until the final output: stop/length/abort/error
    detail: str = ""  # why, for abort and error
    usage: Usage | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def outcome(self) -> str | None:
        """See `outcome`."""
        return outcome(self.finish_reason, self.detail)


class RequestStream:
    """Iterate to receive outputs as they are produced; iteration ends after the final one."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._queue: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()  # C, no task tracking
        self._notify: Callable[[], None] | None = None
        # Tokens put and taken: each counter has one writer (the engine loop, the reader), so
        # neither needs a lock; their difference is what a reader that stopped reading holds.
        self._put_tokens = self._taken_tokens = 0
        self.finished = False

    @property
    def pending_tokens(self) -> int:
        """Tokens of the outputs waiting to be taken."""
        return self._put_tokens - self._taken_tokens

    def put(self, output: RequestOutput) -> None:
        self._put_tokens += len(output.token_ids)
        self._queue.put(output)
        # Read after the put: either this sees the callback, or `notify` sees the output.
        callback = self._notify
        if callback is not None:
            callback()

    def _taken(self, output: RequestOutput) -> RequestOutput:
        self._taken_tokens += len(output.token_ids)
        return output

    def notify(self, callback: Callable[[], None]) -> None:
        """Calls `callback()` after every later `put`, on the putting thread (the engine loop:
        it must be quick and must not block), and once now if outputs are already waiting.
        A wake-up may come with nothing new to read: drain with `get_nowait` until Empty."""
        self._notify = callback
        if not self._queue.empty():
            callback()

    def get(self, timeout: float | None = None) -> RequestOutput:
        return self._taken(self._queue.get(timeout=timeout))

    def get_nowait(self) -> RequestOutput:
        """The next output; raises queue.Empty when none is waiting."""
        return self._taken(self._queue.get_nowait())

    def __iter__(self):
        while not self.finished:
            out = self.get()
            self.finished = out.finished
            yield out

    def result(self) -> "Completion":
        """Drains the stream into one `Completion` (blocking until the final output)."""
        token_ids, text, logprobs, last = [], [], [], None
        for last in self:
            token_ids.extend(last.token_ids)
            text.append(last.text)
            logprobs.extend(last.logprobs or ())
        return Completion(self.request_id, tuple(token_ids), "".join(text), last.finish_reason,
                          last.detail, last.usage, tuple(logprobs) if logprobs else None)


@dataclasses.dataclass(frozen=True)
class Completion:
    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str
    detail: str
    usage: Usage | None
    logprobs: tuple[TokenLogprobs, ...] | None = None

    @property
    def outcome(self) -> str | None:
        return outcome(self.finish_reason, self.detail)
