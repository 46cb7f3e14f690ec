"""`EngineConnection`: one engine process and its two pipes, as `EngineClient` uses them.

Spawns the process from the deployment config (`engine_process.engine_main`), waits for its
`Ready` (bounded), sends messages from a sender thread (a caller never blocks on a full pipe),
and hands each received `EventBatch` to a callback on a receiver thread; when the pipe closes it
calls `on_gone` once. `last_heard` tells when the process last sent anything (it sends at least
every HEARTBEAT_INTERVAL_S: silence means it is stuck). A connection is used once: a restarted
engine is a new connection.

Knows processes, pipes and threads; not requests, streams or restarts (the client's).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable

from jaxgen.config import Config
from jaxgen.server import engine_messages as msg
from jaxgen.server.engine_process import engine_main

log = logging.getLogger(__name__)

KILL_WAIT_S = 5.0  # after SIGKILL, for the kernel to reap the process


class EngineConnection:
    def __init__(self, config: Config, on_events: Callable[["EngineConnection", msg.EventBatch], None],
                 on_gone: Callable[["EngineConnection"], None]):
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold a device
        requests_r, self._requests = ctx.Pipe(duplex=False)
        self._events, events_w = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=engine_main, args=(config, os.getpid(), requests_r, events_w),
                                 name="jaxgen-engine", daemon=True)
        self._proc.start()
        requests_r.close()
        events_w.close()
        self._on_events, self._on_gone = on_events, on_gone
        self._reap_lock = threading.Lock()  # see exited
        self._outbox: list = []
        self._wake = threading.Condition()
        self.failed = False  # set by the client once it has handled this process's failure
        self.last_heard = time.monotonic()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def await_ready(self, timeout_s: float) -> msg.Ready:
        """The process's `Ready`; raises what its start raised, or RuntimeError if it exits or
        says nothing within `timeout_s` (then it is killed)."""
        try:
            if not self._events.poll(timeout_s):
                self.kill()
                raise RuntimeError(f"the engine process was not ready within {timeout_s:g}s")
            message = self._events.recv()
        except EOFError:
            self.exited(5)
            raise RuntimeError(f"the engine process exited during start-up ({self.exit_cause()}); "
                               f"its output above says why") from None
        if isinstance(message, msg.Failed):
            raise message.error
        if not isinstance(message, msg.Ready):
            raise RuntimeError(f"the engine process sent {type(message).__name__} before Ready")
        self.last_heard = time.monotonic()
        return message

    def start(self) -> None:
        """Starts the sender and receiver threads (after `await_ready`)."""
        for target, name in ((self._send_loop, "jaxgen-engine-send"),
                             (self._receive_loop, "jaxgen-engine-receive")):
            threading.Thread(target=target, name=name, daemon=True).start()

    def post(self, message) -> None:
        """Queues `message` for the sender thread."""
        with self._wake:
            self._outbox.append(message)
            self._wake.notify()

    def exited(self, timeout_s: float) -> bool:
        """Whether the process has exited within `timeout_s`; reaps it if so.

        Two threads joining one process race in waitpid: the loser gets ECHILD and then sees
        the process alive. So only this method reaps, one caller at a time. The wait itself is
        on the exit sentinel, unlocked; once it fires the process has closed its files, which
        the kernel does just before it turns it into a zombie, so the reap that follows blocks
        (a non-blocking waitpid there can still find it running)."""
        exiting = multiprocessing.connection.wait([self._proc.sentinel], timeout_s)
        with self._reap_lock:
            if exiting:
                self._proc.join()
            return self._proc.exitcode is not None

    def kill(self) -> None:
        """SIGKILL (which also ends a stopped process), then reaps it."""
        if not self.exited(0):
            self._proc.kill()
            self.exited(KILL_WAIT_S)

    def stop(self, timeout_s: float) -> bool:
        """Asks the process to stop and waits for its own exit; kills it past `timeout_s`.
        Whether it stopped by itself."""
        self.post(msg.Stop())
        if self.exited(timeout_s):
            return True
        self.kill()
        return False

    def exit_cause(self) -> str:
        """How the process ended, in words: "killed by SIGKILL", "exit code 1", "running"."""
        code = self._proc.exitcode
        if code is None:
            return "running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    # -- the two threads ----------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            with self._wake:
                while not self._outbox:
                    self._wake.wait()
                batch, self._outbox = self._outbox, []
            try:
                self._requests.send(batch)
            except (OSError, ValueError):  # the process is gone: the receiver says so
                return
            if isinstance(batch[-1], msg.Stop):
                return

    def _receive_loop(self) -> None:
        try:
            while True:
                batch: msg.EventBatch = self._events.recv()
                self.last_heard = time.monotonic()
                self._on_events(self, batch)
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("reading the engine process failed")
        self.post(msg.Stop())  # ends the sender thread too
        self._on_gone(self)
