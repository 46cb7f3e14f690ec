"""`EngineClient`: the engine in a process of its own (`jaxgen serve`'s default), seen from the
server process through the engine surface (`EngineSurface`), as the in-process `Engine` is; and
restarted when that process dies or hangs.

Why a process: in one process the gRPC front end and the engine loop share one GIL. Under load
the event loop held the GIL about four times as long as the engine thread (py-spy `--gil` on the
CPU box), and every moment the engine thread waits for it the device may idle; with the engine
in its own process the two never contend (docs/benchmarks.md has the measurements). vLLM (its
V1 engine core) and SGLang (its scheduler process) are split the same way. A process can also be
killed and started again, which a thread stuck in a device call cannot.

The client runs the surface's checks before queueing (`check_request`, the queue bound), so a
caller gets the same exceptions as from `Engine.add_request`; the rare refusal only the engine
can make ends the stream (a full queue as shed load, RESOURCE_EXHAUSTED). The finish path is the
surface's (`OpenRequests`): observers run here, `on_step` and `on_launch` as forwarded,
`on_finish` when a final output arrives. If the server process dies, the engine process exits.

Recovery: when the engine process exits unasked (a crash, the OOM killer, SIGKILL), reports its
engine dead, or sends nothing for longer than the step watchdog's limit (stopped, or wedged),
it is killed and a new one started from the same config (`EngineConnection`; the persistent
compilation cache makes its warm-up quick), after a back-off, while `RestartBreaker` allows.
Meanwhile `restarting` is set (health NOT_SERVING, new requests refused as UNAVAILABLE).
An engine over several processes (jaxgen.distributed) is never restarted alone: any failure
ends it with `GroupLostError` (the server drains and exits with its status, as every process of
the group does), to be restarted with the whole group.
Requests that had streamed nothing are kept and sent to the new engine with their arrival time
(their wait shows as queue time); those that had streamed output end with an error whose detail
starts with ENGINE_UNAVAILABLE (UNAVAILABLE / 503: they may be retried). Once the breaker opens,
`dead` is set and every request ends so: the server drains and exits non-zero.

The queue bound: at most `max_waiting + slots` requests held at once (with every slot busy,
exactly `max_waiting` waiting, as in one process). At the bound a request more urgent than one
still unanswered goes through: the engine's scheduler displaces the least urgent waiting one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import shutil
import threading
import time
import uuid

from jaxgen.config import Config
from jaxgen.engine_api import (EngineDeadError, EngineHungError, EngineInfo, EngineStats,
                               GroupLostError, Observers, OpenRequests, QueueFullError,
                               check_request)
from jaxgen.request_stream import ENGINE_UNAVAILABLE, SHED, RequestOutput, RequestStream
from jaxgen.server import engine_messages as msg
from jaxgen.server.engine_connection import EngineConnection
from jaxgen.server.restart_breaker import RestartBreaker

log = logging.getLogger(__name__)

START_TIMEOUT_S = 1800.0  # for an engine process to load and warm up
STOP_TIMEOUT_S = 30.0  # the server's wait for the engine process to exit
PROFILE_EXTRA_S = 300.0  # beyond the duration: the pause, JAX's export, the Perfetto copy
WATCH_INTERVAL_S = 0.5
# Counters of EngineStats, summed over the engine processes a client has had.
_COUNTERS = ("num_preemptions", "num_displaced", "num_queue_timeouts",
             "prefix_cache_query_tokens", "prefix_cache_hit_tokens", "compilations_after_warmup")


class EngineClient:
    """Starts the engine process from `config` (loading the model and warming up, which blocks
    the caller until it is ready) and serves the engine surface over its pipes."""

    def __init__(self, config: Config):
        self._config = config
        self._breaker = RestartBreaker(config.server.max_engine_restarts)
        self.observers = Observers()
        self.dead: BaseException | None = None
        self.restarting: BaseException | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._open = OpenRequests(self.observers)
        # Requests that have streamed nothing yet: sent again to a restarted engine.
        self._unanswered: dict[str, msg.AddRequest] = {}
        self._profiles: dict[int, concurrent.futures.Future] = {}
        self._profile_seq = itertools.count()
        self._conn, ready = self._connect()
        from jaxgen.tokenizer import load_tokenizer

        try:
            self.tokenizer = load_tokenizer(ready.tokenizer_dir)
        except BaseException:
            self._conn.kill()
            raise
        finally:
            shutil.rmtree(ready.tokenizer_dir, ignore_errors=True)
        self._info: EngineInfo = ready.info
        self._carried = EngineStats()  # counters of the engine processes before this one
        self._stats: EngineStats = ready.stats
        self._capacity = self._info.max_waiting + self._info.num_slots
        self._conn.start()
        threading.Thread(target=self._watch, name="jaxgen-engine-watch", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self._conn.pid

    def info(self) -> EngineInfo:
        return self._info

    def stats(self) -> EngineStats:
        """As of the engine's last message (an idle engine reports a few times a second), with
        the counters of the engine processes before it."""
        return self._stats

    def _connect(self) -> tuple[EngineConnection, msg.Ready]:
        conn = EngineConnection(self._config, self._on_events, self._on_gone)
        try:
            return conn, conn.await_ready(START_TIMEOUT_S)
        except BaseException:
            conn.kill()
            raise

    # -- requests -----------------------------------------------------------------------------

    def add_request(self, prompt_ids, params, request_id: str | None = None,
                    deadline: float | None = None, after: str | None = None) -> RequestStream:
        """As `Engine.add_request`: RequestError for bad input, QueueFullError at the bound
        (nothing is queued then), EngineDeadError while the engine is dead or restarting."""
        request_id = request_id or uuid.uuid4().hex
        prompt_ids = tuple(prompt_ids)
        check_request(self._info, prompt_ids, params)
        with self._lock:  # the bound and the opening as one: callers may be on several threads
            self._check_serving()
            if len(self._open) >= self._capacity and not any(
                    m.params.priority > params.priority for m in self._unanswered.values()):
                raise QueueFullError(f"waiting queue is full: max_waiting={self._info.max_waiting}")
            stream = self._open.open(request_id, prompt_ids)
            add = msg.AddRequest(request_id, prompt_ids, params, deadline, after, time.monotonic())
            self._unanswered[request_id] = add
            self._conn.post(add)
        return stream

    def _check_serving(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(f"engine is not serving: {type(self.dead).__name__}: {self.dead}")
        if self.restarting is not None:
            raise EngineDeadError(f"the engine is restarting after a failure "
                                  f"({self.restarting}); retry shortly")

    def abort(self, request_id: str) -> None:
        """Ends the request at the engine's next step (at once while the engine restarts);
        unknown ids are ignored."""
        with self._lock:
            if request_id not in self._open:
                return
            if self.restarting is None:
                self._conn.post(msg.AbortRequest(request_id))
                return
            self._unanswered.pop(request_id, None)
        self._open.deliver(RequestOutput(request_id, (), "", None, "abort", "aborted"))

    def capture_profile(self, duration_s: float) -> str:
        """A profiler trace of the engine process (taken there with its engine paused at step
        boundaries to switch the trace); returns its directory. Raises what the capture raised
        there, EngineDeadError if the engine process is gone."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._check_serving()
            seq = next(self._profile_seq)
            self._profiles[seq] = future
            self._conn.post(msg.CaptureProfile(seq, duration_s))
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
        `Engine.stop`) and waits for it to exit by itself; kills it only past STOP_TIMEOUT_S.
        A restart in progress is abandoned."""
        with self._lock:
            self._stopping.set()
            conn = self._conn
        if not conn.stop(STOP_TIMEOUT_S):
            log.warning("the engine process did not stop within %gs; killed it", STOP_TIMEOUT_S)
        self._open.fail_all("the server stopped")

    # -- events -------------------------------------------------------------------------------

    def _on_events(self, conn: EngineConnection, batch: msg.EventBatch) -> None:
        if conn is not self._conn or conn.failed:
            return  # a failed or replaced process's last words: its counters are carried
        self._stats = _with_counters(batch.stats, self._carried, self._breaker.total)
        for event in batch.events:
            try:
                self._handle(conn, event)
            except Exception:  # one bad event must not stop the others
                log.exception("engine event %s failed", type(event).__name__)

    def _handle(self, conn: EngineConnection, event) -> None:
        if isinstance(event, msg.Output):
            out = event.output
            with self._lock:
                if conn.failed:  # kept requests start again on the next engine
                    return
                if out.request_id in self._unanswered and (out.token_ids or out.finished):
                    # Its first output, delivered under the lock: a failure handled meanwhile
                    # ends the request after this output, never before it.
                    del self._unanswered[out.request_id]
                    self._open.deliver(out)
                    return
            self._open.deliver(out)
        elif isinstance(event, msg.StepTimed):
            self.observers.notify("on_step", event.step_seconds, event.host_gap_seconds)
        elif isinstance(event, msg.LaunchTimed):
            self.observers.notify("on_launch", event.device_drained, event.launch_seconds)
        elif isinstance(event, msg.DraftsVerified):
            self.observers.notify("on_drafts", event.drafts, event.accepted)
        elif isinstance(event, msg.Rejected):
            with self._lock:
                if conn.failed:
                    return
                self._unanswered.pop(event.request_id, None)
            reason, detail = (("abort", f"{SHED}: {event.message}; retry later") if event.queue_full
                              else ("error", event.message))
            self._open.deliver(RequestOutput(event.request_id, (), "", None, reason, detail))
        elif isinstance(event, msg.Profiled):
            with self._lock:
                future = self._profiles.get(event.seq)
            if future is not None and not future.done():
                if event.error is None:
                    future.set_result(event.directory)
                else:
                    future.set_exception(event.error)
        elif isinstance(event, msg.Dead):
            if event.group_lost:  # the other processes are gone: nothing to restart with
                self._failed(conn, "group_lost", event.message)
            else:
                cause = "hung" if event.hung else "failed"
                self._failed(conn, cause, f"the engine failed: {event.message}")
        else:
            log.error("unknown engine event %r", event)

    def _on_gone(self, conn: EngineConnection) -> None:
        conn.exited(1)
        if self._stopping.is_set():
            self._open.fail_all(f"the engine process exited ({conn.exit_cause()})")
            return
        cause = "killed" if conn.exit_cause().startswith("killed") else "exited"
        self._failed(conn, cause, f"the engine process exited ({conn.exit_cause()})")

    def _watch(self) -> None:
        """The step watchdog's server side: a process that sends nothing (not even its
        heartbeat) for longer than the step limit is stuck, e.g. stopped (SIGSTOP) or wedged in
        a device call with the GIL held."""
        while self._info.step_timeout_s and not self._stopping.wait(WATCH_INTERVAL_S):
            conn, limit = self._conn, self._info.step_timeout_s
            silent = time.monotonic() - conn.last_heard
            if silent > limit and not conn.failed:
                self._failed(conn, "hung", f"the engine process sent nothing for {silent:.0f}s, "
                                           f"over step_timeout={limit:g}s: it is hung")

    # -- failure and restart ------------------------------------------------------------------

    def _failed(self, conn: EngineConnection, cause: str, detail: str) -> None:
        """Handles the failure of `conn`'s process once: ends what cannot be kept, and restarts
        the engine (or, past the breaker's limit, declares it dead)."""
        with self._lock:
            if conn is not self._conn or conn.failed or self._stopping.is_set():
                return
            conn.failed = True
            # An engine over several processes (jaxgen.distributed) is never restarted alone:
            # the group stops, and the orchestrator restarts every process.
            # the group stops (every process exits GroupLostError.exit_status), and the
            # orchestrator restarts every process.
            grouped = self._config.distributed.enabled
            restart = not grouped and self._breaker.allow()
            why = ("an engine over several processes restarts with its group" if grouped
                   else self._breaker.describe())
            kept = set(self._unanswered) if restart else set()
            lost = [rid for rid in self._open.ids() if rid not in kept]
            if restart:
                self.restarting = EngineDeadError(detail)
            else:
                if grouped:
                    self.dead = GroupLostError(detail if cause == "group_lost"
                                               else f"{detail}; not restarted: {why}")
                else:
                    self.dead = (EngineHungError if cause == "hung" else EngineDeadError)(
                        f"{detail}; not restarted: {why}")
                self._unanswered.clear()
            self._carried = self._stats  # the counters so far, all processes included
            profiles, self._profiles = list(self._profiles.values()), {}
        log.error("%s; %s (%d request(s) kept, %d ended as retryable)", detail,
                  f"restarting it ({why})" if restart else f"not restarting it: {why}",
                  len(kept), len(lost))
        conn.kill()
        why = ("the request had streamed output, it may be retried" if restart
               else "the engine is not restarted, the request may be retried elsewhere")
        for request_id in lost:
            self._open.deliver(RequestOutput(request_id, (), "", None, "error",
                                             f"{ENGINE_UNAVAILABLE}: {detail}; {why}"))
        for future in profiles:
            if not future.done():
                future.set_exception(EngineDeadError(detail))
        self.observers.notify("on_engine_failure", cause, detail, restart)
        if restart:
            threading.Thread(target=self._restart, args=(time.monotonic(),),
                             name="jaxgen-engine-restart", daemon=True).start()

    def _restart(self, failed_at: float) -> None:
        """Starts engine processes (after the breaker's back-off) until one is ready, the
        breaker opens or the client stops; then resumes the kept requests on it."""
        while not self._stopping.wait(self._breaker.backoff_s()):
            try:
                conn, ready = self._connect()
            except Exception as e:
                if self._restart_failed(e):
                    continue
                return
            shutil.rmtree(ready.tokenizer_dir, ignore_errors=True)
            resent = self._resume(conn, ready)
            if resent is None:  # the client stopped while this process warmed up
                conn.stop(STOP_TIMEOUT_S)
                return
            seconds = time.monotonic() - failed_at
            log.warning("engine process restarted in %.1fs (pid %d); %d request(s) resumed",
                        seconds, conn.pid, resent)
            self.observers.notify("on_engine_restart", seconds)
            return

    def _resume(self, conn: EngineConnection, ready: msg.Ready) -> int | None:
        """Makes `conn` the engine and sends it the kept requests still open; their count
        (None when the client has stopped)."""
        with self._lock:
            if self._stopping.is_set():
                return None
            self._conn = conn
            self._info = ready.info  # its warm-up may differ (step_timeout_s, from the cache)
            self._stats = _with_counters(ready.stats, self._carried, self._breaker.total)
            resent = [m for rid, m in self._unanswered.items() if rid in self._open]
            for add in resent:
                conn.post(add)
            conn.start()
            self.restarting = None
        return len(resent)

    def _restart_failed(self, e: Exception) -> bool:
        """A restarted process did not start: whether to try again (the breaker counts it)."""
        log.error("the restarted engine process failed to start: %s", e)
        with self._lock:
            if self._breaker.allow():
                return True
            self.dead = EngineDeadError(f"the engine failed and could not be restarted ({e}); "
                                        f"not restarted: {self._breaker.describe()}")
            self.restarting = None
            self._unanswered.clear()
        self._open.fail_all(f"{ENGINE_UNAVAILABLE}: {self.dead}")
        return False


def _with_counters(stats: EngineStats, carried: EngineStats, restarts: int) -> EngineStats:
    """`stats` with `carried`'s counters added (those of earlier engine processes)."""
    return dataclasses.replace(stats, num_engine_restarts=restarts, **{
        f: getattr(stats, f) + getattr(carried, f) for f in _COUNTERS})
