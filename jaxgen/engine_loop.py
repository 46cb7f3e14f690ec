"""`EngineLoop`: the thread that steps an engine while it has work.

It sleeps on the engine's condition (callers that add or abort work notify it), steps while the
scheduler has work, pauses at a step boundary with nothing in flight while `quiesced()` callers
wait (e.g. a profiler trace starting or stopping), and runs each step under the step watchdog.
It knows the engine only through the callables it is given: `step`, `drain` (read every launched
step), `has_work` and `in_flight` (read under the lock), `idle` (an idle wait begins) and `dead`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

from jaxgen.step_watchdog import StepWatchdog

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, work: threading.Condition, *, step: Callable[[], object],
                 drain: Callable[[], None], has_work: Callable[[], bool],
                 in_flight: Callable[[], int], idle: Callable[[], None],
                 dead: Callable[[], bool], on_crash: Callable[[BaseException], None]):
        self._work = work
        self._step, self._drain, self._has_work = step, drain, has_work
        self._in_flight, self._idle, self._dead, self._on_crash = in_flight, idle, dead, on_crash
        self._thread: threading.Thread | None = None
        self._watchdog: StepWatchdog | None = None
        self._stopping = False
        self._pauses = 0  # quiesced() callers waiting or inside
        self._quiet = threading.Event()  # set while paused with nothing in flight, or ended

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, step_timeout_s: float | None, on_hung: Callable[[float], None]) -> None:
        """Starts the thread; with `step_timeout_s`, a watchdog calls `on_hung` once for a step
        that runs longer."""
        if step_timeout_s:
            self._watchdog = StepWatchdog(step_timeout_s, on_hung).start()
        self._thread = threading.Thread(target=self._run, name="jaxgen-engine", daemon=True)
        self._thread.start()

    def stop(self, join_timeout_s: float | None) -> None:
        """Ends the thread after its step; waits for it up to `join_timeout_s` (None: until it
        ends)."""
        with self._work:
            self._stopping = True
            self._work.notify()
        if self._watchdog is not None:
            self._watchdog.stop()
        if self._thread is not None:
            self._thread.join(join_timeout_s)

    @contextlib.contextmanager
    def quiesced(self, timeout_s: float):
        """Pauses the loop at a step boundary with nothing in flight (every launched step read,
        so the device is idle) for the body of the `with`; stepping resumes after it. Without a
        thread (offline use) the caller's thread reads the launched steps; once the thread has
        ended (stopped or dead) nothing is launched and nobody waits. Raises TimeoutError if the
        loop does not reach a step boundary within `timeout_s`."""
        with self._work:
            self._pauses += 1
            self._work.notify_all()
        try:
            if self.running:
                if not self._quiet.wait(timeout_s):
                    raise TimeoutError(f"the engine did not pause within {timeout_s}s")
            else:
                self._drain()
            yield
        finally:
            with self._work:
                self._pauses -= 1
                if self._pauses == 0:
                    self._quiet.clear()
                self._work.notify_all()

    def _run(self) -> None:
        try:
            while True:
                with self._work:
                    while not self._stopping and (self._pauses or not self._has_work()):
                        if self._pauses and self._in_flight():
                            break  # drain first, outside the lock
                        if self._pauses:
                            self._quiet.set()
                        self._idle()  # an idle wait is not a host gap
                        self._work.wait()
                    if self._stopping:
                        return
                    pausing = bool(self._pauses)
                with self._watched():
                    if pausing:
                        self._drain()
                    else:
                        self._step()
                if self._dead():
                    return
        except BaseException as e:  # the loop must never die silently: health reads `dead`
            log.exception("engine loop crashed")
            self._on_crash(e)
            raise
        finally:  # no step will be launched any more: a quiesced() caller need not wait
            self._quiet.set()

    def _watched(self):
        return self._watchdog.step() if self._watchdog is not None else contextlib.nullcontext()
