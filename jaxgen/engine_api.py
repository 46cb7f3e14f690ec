"""The engine surface: all that front ends (gRPC, HTTP, batch jobs, the CLI, metrics) see of an
engine, whether it runs in-process (`jaxgen.engine.Engine`) or in a process of its own
(`jaxgen.server.engine_client.EngineClient`). Both implement `EngineSurface`.

Also here, shared by both implementations so each is written once: the errors a front end maps
to a status (`QueueFullError`, `RequestError`, `EngineDeadError`), the request checks that need
no engine state (`check_request`), the observers' interface and their isolation (`Observers`),
and the one finish path of a request (`OpenRequests`: observers first, then the stream).

Plain data and the standard library: no jax, no scheduler internals beyond its queue-full error.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from jaxgen.request_stream import RequestOutput, RequestStream
from jaxgen.sampling_params import SamplingParams
from jaxgen.scheduler import QueueFullError

log = logging.getLogger(__name__)

__all__ = ["EngineDeadError", "EngineHungError", "EngineInfo", "EngineObserver", "EngineStats",
           "EngineSurface", "GroupLostError",
           "FinishedRequest", "Observers", "OpenRequests", "QueueFullError", "RequestError",
           "RequestTooLongError", "add_choices", "check_request"]


class RequestError(ValueError):
    """A request the engine refuses as given (bad token ids, empty prompt): the message names
    the field, the value and the limit. Front ends answer INVALID_ARGUMENT / 400."""


class RequestTooLongError(RequestError):
    """prompt + max_tokens exceeds max_model_len."""


class EngineDeadError(RuntimeError):
    """The engine can no longer serve (its loop or device failed, its process died), or not
    now (it is restarting): front ends answer UNAVAILABLE / 503."""


class EngineHungError(EngineDeadError):
    """A device step ran past the step watchdog's limit (`EngineInfo.step_timeout_s`)."""


class GroupLostError(EngineDeadError):
    """The engine ran over several processes (jaxgen.distributed) and one was lost: it died,
    stopped answering or failed a step. Requests in flight end UNAVAILABLE (retryable), and
    every process of the group exits with `exit_status`."""

    exit_status = 3


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """What an engine serves and with which limits; fixed once it is ready."""

    name: str  # the served model name
    architecture: str
    vocab_size: int
    max_position_embeddings: int
    dtype: str
    num_slots: int
    num_pages: int
    page_size: int
    max_model_len: int  # prompt + max_tokens limit of one request
    max_waiting: int
    decode_steps: int
    max_prefill_tokens: int
    device: str  # e.g. "gpu x1"
    mesh: tuple[tuple[str, int], ...]  # (axis, size), e.g. (("data", 1), ("model", 8))
    jax_version: str
    warmup_seconds: float | None = None
    step_timeout_s: float | None = None  # the step watchdog's limit (None: off)


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """Counters of an engine, one consistent snapshot (taken under the engine's lock)."""

    num_running: int = 0
    num_waiting: int = 0
    num_free_slots: int = 0
    num_pages_used: int = 0
    num_pages_free: int = 0  # allocatable now: free plus cached pages nobody holds
    num_preemptions: int = 0
    num_displaced: int = 0  # shed from a full queue by a more urgent request
    num_queue_timeouts: int = 0  # shed after waiting longer than max_queue_time
    prefix_cache_query_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    compilations_after_warmup: int = 0
    num_engine_restarts: int = 0  # engine processes restarted after a failure (EngineClient)


@dataclasses.dataclass(frozen=True)
class FinishedRequest:
    """A request's final output, as observers see it."""

    output: RequestOutput  # finish_reason, detail and usage set
    prompt_ids: tuple[int, ...]
    e2e_seconds: float  # add_request -> final output


class EngineObserver:
    """Told what the engine does; methods run on the engine's delivery thread and must be
    quick. An exception in one is logged and ignored."""

    def on_step(self, step_seconds: float, host_gap_seconds: float | None) -> None:
        """`step_seconds`: one step, from its launch to its tokens on host; `host_gap_seconds`:
        from the previous step's tokens on host to this step's launch (0 when it was launched
        ahead, before them), None after an idle wait."""

    def on_launch(self, device_drained: bool, launch_seconds: float) -> None:
        """A step was launched while others were in flight (told when its tokens are read);
        `device_drained`: by the time its dispatch returned, the device had finished all of
        them, so it sat idle for part of the host's work on this launch; `launch_seconds`: the
        dispatch itself (uploads and jit calls, which on GPU launch the step's kernels)."""

    def on_finish(self, finished: FinishedRequest) -> None:
        """A request ended (any finish reason)."""

    def on_drafts(self, drafts: int, accepted: int) -> None:
        """Speculative decoding: one request verified `drafts` drafted tokens in a step and
        `accepted` of them were kept."""

    def on_engine_failure(self, cause: str, detail: str, restarting: bool) -> None:
        """The engine failed (cause: "killed", "exited", "hung", "failed", or "group_lost": a
        process of a multi-process engine); `restarting`: whether a restart follows (else the
        restart limit is reached, or the engine spans several processes)."""

    def on_engine_restart(self, seconds: float) -> None:
        """A restarted engine serves again, `seconds` after its failure."""


class Observers(list):
    """The engine's observers (`engine.observers.append(...)`); `notify` isolates failures."""

    def notify(self, method: str, *args) -> None:
        for observer in self:
            try:
                getattr(observer, method)(*args)
            except Exception:  # an observer must never take the engine down
                log.exception("engine observer %r failed in %s", observer, method)


@runtime_checkable
class EngineSurface(Protocol):
    """One engine as a front end sees it."""

    observers: Observers
    tokenizer: object  # jaxgen.tokenizer.Tokenizer

    @property
    def dead(self) -> BaseException | None:
        """Set once the engine can no longer serve, for good: health reports NOT_SERVING and
        a server drains and exits non-zero."""

    @property
    def restarting(self) -> BaseException | None:
        """The failure a restart in progress recovers from; None while serving. Health reports
        NOT_SERVING and add_request raises EngineDeadError meanwhile."""

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams,
                    request_id: str | None = None, deadline: float | None = None,
                    after: str | None = None) -> RequestStream:
        """Queues a request; returns its stream. Raises RequestError (bad input),
        QueueFullError (nothing queued) or EngineDeadError. `after`: the id of another request
        of the same prompt, whose prefill this one waits for (its pages then come from the
        prefix cache: `add_choices`)."""

    def abort(self, request_id: str) -> None:
        """Ends the request at the next step (slot and pages freed); unknown ids are ignored."""

    def stop(self) -> None:
        """Stops the engine; requests still held end without further output."""

    def info(self) -> EngineInfo: ...

    def stats(self) -> EngineStats: ...

    def capture_profile(self, duration_s: float) -> str:
        """A profiler trace of the process that runs the engine, taken with the engine paused at
        step boundaries to switch it; returns its directory."""


def check_request(info: EngineInfo, prompt_ids: Sequence[int], params: SamplingParams) -> None:
    """The checks every engine runs before queueing: a non-empty prompt of in-vocabulary ids,
    stop ids in the vocabulary, and prompt + max_tokens within max_model_len."""
    vocab = info.vocab_size
    if len(prompt_ids) == 0:
        raise RequestError("prompt_ids=[]: a prompt needs at least one token")
    bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise RequestError(f"prompt token id {bad}: outside the vocabulary [0, {vocab})")
    for i, t in enumerate(params.stop_token_ids):
        if not 0 <= t < vocab:
            raise RequestError(f"stop_token_ids[{i}]={t}: outside the vocabulary [0, {vocab})")
    for t, _ in params.logit_bias:
        if not 0 <= t < vocab:
            raise RequestError(f"logit_bias token id {t}: outside the vocabulary [0, {vocab})")
    total = len(prompt_ids) + params.max_tokens
    if total > info.max_model_len:
        raise RequestTooLongError(
            f"len(prompt_ids)={len(prompt_ids)} + max_tokens={params.max_tokens} = {total}: "
            f"exceeds max_model_len={info.max_model_len}")


@dataclasses.dataclass
class _Open:
    stream: RequestStream
    prompt_ids: tuple[int, ...]
    arrival: float  # time.monotonic() at add_request


class OpenRequests:
    """The streams of requests not yet finished, and the one way a request finishes: its final
    output is counted by the observers first (once a caller holds it, the request is counted and
    logged: a draining server may exit as soon as its last stream ends), then put on its
    stream. Thread-safe; observers and stream wake-ups run outside its lock."""

    def __init__(self, observers: Observers):
        self._observers = observers
        self._open: dict[str, _Open] = {}
        self._lock = threading.Lock()

    def open(self, request_id: str, prompt_ids: Sequence[int]) -> RequestStream:
        stream = RequestStream(request_id)
        with self._lock:
            if request_id in self._open:
                raise RequestError(f"request_id={request_id!r}: a request with this id is in flight")
            self._open[request_id] = _Open(stream, tuple(prompt_ids), time.monotonic())
        return stream

    def deliver(self, out: RequestOutput) -> None:
        """Puts `out` on its stream (ignored when the request is not open); a final output
        closes the request."""
        with self._lock:
            entry = (self._open.pop(out.request_id, None) if out.finished
                     else self._open.get(out.request_id))
        if entry is None:
            return
        if out.finished:
            self._observers.notify("on_finish", FinishedRequest(
                out, entry.prompt_ids, time.monotonic() - entry.arrival))
        entry.stream.put(out)

    def fail_all(self, detail: str) -> None:
        """Ends every open request with finish_reason "error" and `detail`."""
        for request_id in self.ids():
            self.deliver(RequestOutput(request_id, (), "", None, "error", detail))

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._open

    def __len__(self) -> int:
        return len(self._open)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._open)


def add_choices(engine: EngineSurface, prompt_ids: Sequence[int], params: Sequence[SamplingParams],
                request_ids: Sequence[str], deadline: float | None = None) -> list[RequestStream]:
    """Queues the choices of one prompt (n = len(params)) as one unit: the first as usual, the
    others admitted once the first's prompt pages are in the prefix cache (`after`), so the
    prompt is prefilled once. All or nothing: if one is refused, those already queued are
    aborted and the error propagates."""
    streams = []
    try:
        for i, (p, request_id) in enumerate(zip(params, request_ids)):
            streams.append(engine.add_request(prompt_ids, p, request_id, deadline,
                                              after=request_ids[0] if i else None))
    except Exception:
        for stream in streams:
            engine.abort(stream.request_id)
        raise
    return streams
