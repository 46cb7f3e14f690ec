"""`StepWatchdog`: notices an engine step that never returns.

A device step can hang (a wedged accelerator, a collective waiting for a peer that is gone, a
deadlock in the runtime) and nothing in the loop thread itself can notice: it is the one
waiting. The watchdog is a second thread that reads the time the current step began and, once
a step has run longer than `timeout_s`, calls `on_hung(seconds)` once. What to do about it is
the caller's: the engine marks itself dead, and a server restarts the engine's process or exits.

Knows time and threads; not the engine, the device or requests.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_POLL_S = 1.0


class StepWatchdog:
    def __init__(self, timeout_s: float, on_hung: Callable[[float], None]):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s}: must be > 0")
        self.timeout_s = timeout_s
        self._on_hung = on_hung
        self._since: float | None = None  # time.monotonic() when the running step began
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="jaxgen-step-watchdog",
                                        daemon=True)

    def start(self) -> "StepWatchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    @contextlib.contextmanager
    def step(self):
        """Marks the body as one step (the loop thread's)."""
        self._since = time.monotonic()
        try:
            yield
        finally:
            self._since = None

    def _watch(self) -> None:
        poll = min(MAX_POLL_S, self.timeout_s / 4)
        while not self._stopped.wait(poll):
            since = self._since
            if since is None:
                continue
            running = time.monotonic() - since
            if running > self.timeout_s:
                try:
                    self._on_hung(running)
                except Exception:  # the watchdog has done its one job either way
                    log.exception("the step watchdog's handler failed")
                return
