"""`EngineClient`: the engine in a process of its own (`jaxgen serve`'s default), seen from the
server process through the engine surface (`EngineSurface`), as the in-process `Engine` is.

Why a process: in one process the gRPC front end and the engine loop share one GIL. Under load
the event loop held the GIL about four times as long as the engine thread (py-spy `--gil` on the
CPU box), and every moment the engine thread waits for it the device may idle; with the engine
in its own process the two never contend (docs/benchmarks.md has the measurements). vLLM (its
V1 engine core) and SGLang (its scheduler process) are split the same way.

The client runs the surface's checks before queueing (`check_request`, the queue bound), so a
caller gets the same exceptions as from `Engine.add_request`; the rare refusal only the engine
can make ends the stream with an error. Messages are the dataclasses of `engine_messages`. The
finish path is the surface's (`OpenRequests`): observers run here, `on_step` and `on_launch` as
forwarded, `on_finish` when a final output arrives. If the engine process dies, every open
stream ends with an error and `dead` is set (health NOT_SERVING); if the server process dies,
the engine process exits.

The queue bound: at most `max_waiting + slots` requests held at once (with every slot busy,
exactly `max_waiting` waiting, as in one process); the engine process's own bound is above that,
so it never refuses what was accepted here.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import threading
import uuid

from jaxgen.config import Config
from jaxgen.engine_api import (EngineDeadError, EngineInfo, EngineStats, GroupLostError,
                               Observers, OpenRequests, QueueFullError, check_request)
from jaxgen.request_stream import RequestOutput, RequestStream
from jaxgen.server import engine_messages as msg
from jaxgen.server.engine_process import engine_main

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0  # the server's wait for the engine process to exit
PROFILE_EXTRA_S = 300.0  # beyond the duration: the pause, JAX's export, the Perfetto copy


class EngineClient:
    """Starts the engine process from `config` (loading the model and warming up, which blocks
    the caller until it is ready) and serves the engine surface over its pipes."""

    def __init__(self, config: Config):
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold a device
        requests_r, self._requests = ctx.Pipe(duplex=False)
        self._events, events_w = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=engine_main, args=(config, os.getpid(), requests_r, events_w),
                                 name="jaxgen-engine", daemon=True)
        self._proc.start()
        requests_r.close()
        events_w.close()
        self._reap_lock = threading.Lock()  # see _exited
        self.observers = Observers()
        self.dead: BaseException | None = None
        self._stopping = False
        try:
            ready = self._await_ready()
            from jaxgen.tokenizer import load_tokenizer

            try:
                self.tokenizer = load_tokenizer(ready.tokenizer_dir)
            finally:
                shutil.rmtree(ready.tokenizer_dir, ignore_errors=True)
        except BaseException:
            self._kill()
            raise
        self._info: EngineInfo = ready.info
        self._stats: EngineStats = ready.stats
        self._capacity = self._info.max_waiting + self._info.num_slots
        self._lock = threading.Lock()
        self._open = OpenRequests(self.observers)
        self._profiles: dict[int, concurrent.futures.Future] = {}
        self._profile_seq = itertools.count()
        self._outbox: list = []
        self._wake = threading.Condition(self._lock)
        self._sender = threading.Thread(target=self._send_loop, name="jaxgen-engine-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive_loop, name="jaxgen-engine-receive",
                                          daemon=True)
        self._sender.start()
        self._receiver.start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def info(self) -> EngineInfo:
        return self._info

    def stats(self) -> EngineStats:
        """As of the engine's last message (an idle engine reports a few times a second)."""
        return self._stats

    def _await_ready(self) -> msg.Ready:
        try:
            message = self._events.recv()
        except EOFError:
            self._exited(5)
            raise RuntimeError(f"the engine process exited during start-up (exit code "
                               f"{self._proc.exitcode}); its output above says why") from None
        if isinstance(message, msg.Failed):
            raise message.error
        if not isinstance(message, msg.Ready):
            raise RuntimeError(f"the engine process sent {type(message).__name__} before Ready")
        return message

    # -- requests -----------------------------------------------------------------------------

    def add_request(self, prompt_ids, params, request_id: str | None = None,
                    deadline: float | None = None, after: str | None = None) -> RequestStream:
        """As `Engine.add_request`: RequestError for bad input, QueueFullError at the bound
        (nothing is queued then), EngineDeadError once the engine is dead."""
        if self.dead is not None:
            raise EngineDeadError(f"engine is not serving: {type(self.dead).__name__}: {self.dead}")
        request_id = request_id or uuid.uuid4().hex
        prompt_ids = tuple(prompt_ids)
        check_request(self._info, prompt_ids, params)
        with self._lock:  # the bound and the opening as one: callers may be on several threads
            if len(self._open) >= self._capacity:
                raise QueueFullError(f"waiting queue is full: max_waiting={self._info.max_waiting}")
            stream = self._open.open(request_id, prompt_ids)
            self._post(msg.AddRequest(request_id, prompt_ids, params, deadline, after))
        return stream

    def abort(self, request_id: str) -> None:
        """Ends the request at the engine's next step; unknown ids are ignored."""
        with self._lock:
            if request_id in self._open:
                self._post(msg.AbortRequest(request_id))

    def capture_profile(self, duration_s: float) -> str:
        """A profiler trace of the engine process (taken there with its engine paused at step
        boundaries to switch the trace); returns its directory. Raises what the capture raised
        there, EngineDeadError if the engine process is gone."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self.dead is not None:
                raise EngineDeadError(f"engine is not serving: {self.dead}")
            seq = next(self._profile_seq)
            self._profiles[seq] = future
            self._post(msg.CaptureProfile(seq, duration_s))
        try:
            return future.result(timeout=duration_s + PROFILE_EXTRA_S)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"the engine process did not finish a {duration_s}s capture "
                               f"within {duration_s + PROFILE_EXTRA_S:g}s") from None
        finally:
            with self._lock:
                self._profiles.pop(seq, None)

    def stop(self) -> None:
        """Stops the engine process (requests still held there end without output, as with
        `Engine.stop`) and waits for it to exit by itself; kills it only past STOP_TIMEOUT_S."""
        with self._lock:
            self._stopping = True
            self._post(msg.Stop())
        if not self._exited(STOP_TIMEOUT_S):
            log.warning("the engine process did not stop within %gs; killing it", STOP_TIMEOUT_S)
            self._kill()
        self._receiver.join(5)

    def _post(self, message) -> None:
        """Queues `message` for the sender thread (the caller holds the lock)."""
        self._outbox.append(message)
        self._wake.notify()

    def _exited(self, timeout_s: float) -> bool:
        """Whether the engine process has exited within `timeout_s`; reaps it if so.

        Two threads joining one process race in waitpid: the loser gets ECHILD and then sees
        the process alive (that was the server's "did not stop within 30s; killing it" seconds
        after a clean stop, the receiver thread joining it at the same time). So only this
        method reaps, one caller at a time. The wait itself is on the exit sentinel, unlocked;
        once it fires the process has closed its files, which the kernel does just before it
        turns it into a zombie, so the reap that follows blocks (a non-blocking waitpid there
        can still find it running)."""
        exiting = multiprocessing.connection.wait([self._proc.sentinel], timeout_s)
        with self._reap_lock:
            if exiting:
                self._proc.join()
            return self._proc.exitcode is not None

    def _kill(self) -> None:
        if not self._exited(0):
            self._proc.kill()
            self._exited(5)

    # -- the two threads ----------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            with self._lock:
                while not self._outbox:
                    self._wake.wait()
                batch, self._outbox = self._outbox, []
            try:
                self._requests.send(batch)
            except (OSError, ValueError):  # the engine process is gone: the receiver says so
                return
            if isinstance(batch[-1], msg.Stop):
                return

    def _receive_loop(self) -> None:
        try:
            while True:
                batch: msg.EventBatch = self._events.recv()
                self._stats = batch.stats
                for event in batch.events:
                    try:
                        self._handle(event)
                    except Exception:  # one bad event must not stop the others
                        log.exception("engine event %s failed", type(event).__name__)
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("reading the engine process failed")
        self._engine_gone()

    def _handle(self, event) -> None:
        if isinstance(event, msg.Output):
            self._open.deliver(event.output)
        elif isinstance(event, msg.StepTimed):
            self.observers.notify("on_step", event.step_seconds, event.host_gap_seconds)
        elif isinstance(event, msg.LaunchTimed):
            self.observers.notify("on_launch", event.device_drained, event.launch_seconds)
        elif isinstance(event, msg.DraftsVerified):
            self.observers.notify("on_drafts", event.drafts, event.accepted)
        elif isinstance(event, msg.Rejected):
            self._open.deliver(RequestOutput(event.request_id, (), "", None, "error", event.message))
        elif isinstance(event, msg.Profiled):
            with self._lock:
                future = self._profiles.get(event.seq)
            if future is not None and not future.done():
                if event.error is None:
                    future.set_result(event.directory)
                else:
                    future.set_exception(event.error)
        elif isinstance(event, msg.Dead):
            self.dead = (GroupLostError if event.group_lost else EngineDeadError)(event.message)
        else:
            log.error("unknown engine event %r", event)

    def _engine_gone(self) -> None:
        """The engine process's pipe closed: if unasked, the engine is dead; either way every
        request still open ends with an error (nothing is left to answer it)."""
        self._exited(1)
        detail = f"the engine process exited (exit code {self._proc.exitcode})"
        if not self._stopping and self.dead is None:
            log.error("%s", detail)
            self.dead = EngineDeadError(detail)
        with self._lock:
            profiles = list(self._profiles.values())
        self._open.fail_all(detail)
        for future in profiles:
            if not future.done():
                future.set_exception(EngineDeadError(detail))
