"""The engine process's side of `EngineClient`: `engine_main` builds the engine from the
deployment config with `build_engine` (as in-process serving does), reports `Ready`, then moves
requests in on its main thread and outputs out on a sender thread until told to stop or the
server process goes away. Messages: `jaxgen.server.engine_messages`.

A clean stop ends with this process's own exit: every step of it is bounded (the engine loop,
the last outputs), then `os._exit(0)`.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import tempfile
import threading
import time

from jaxgen.config import Config
from jaxgen.engine_api import EngineHungError, EngineObserver, GroupLostError, QueueFullError
from jaxgen.request_stream import RequestStream
from jaxgen.server import engine_messages as msg
from jaxgen.server.stream_bridge import drain

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.25  # an idle engine still reports its counters this often
PARENT_WATCH_INTERVAL_S = 0.5
ENGINE_STOP_TIMEOUT_S = 15.0  # for the engine loop to end its step
FLUSH_TIMEOUT_S = 5.0  # for the last outputs to be sent


class _Forward(EngineObserver):
    def __init__(self, core: "_EngineCore"):
        self.core = core

    def on_step(self, step_seconds, host_gap_seconds):
        self.core.emit(msg.StepTimed(step_seconds, host_gap_seconds))

    def on_launch(self, device_drained, launch_seconds):
        self.core.emit(msg.LaunchTimed(device_drained, launch_seconds))

    def on_drafts(self, drafts, accepted):
        self.core.emit(msg.DraftsVerified(drafts, accepted))


class _EngineCore:
    """Requests in on the main thread, outputs out on a sender thread."""

    def __init__(self, engine, events):
        self.engine, self.events = engine, events
        self._outbox: list = []
        self._cond = threading.Condition()
        self._closing = False
        self._dead_sent = False
        engine.observers.append(_Forward(self))

    def emit(self, event) -> None:
        with self._cond:
            self._outbox.append(event)
            self._cond.notify()

    def _forward(self, stream: RequestStream) -> None:
        """The stream's wake-up (on the engine thread): its outputs to the outbox, in order
        (drained under the outbox's lock, so two wake-ups cannot interleave them)."""
        with self._cond:
            self._outbox += [msg.Output(out) for out in drain(stream)]
            self._cond.notify()

    def serve(self, requests) -> None:
        sender = threading.Thread(target=self._send_loop, name="jaxgen-engine-send", daemon=True)
        sender.start()
        try:
            while True:
                try:
                    batch = requests.recv()
                except (EOFError, OSError):  # the server process is gone
                    break
                if not self._handle(batch):
                    break
        finally:
            # Bounded: a loop stuck in a device call must not keep the process alive.
            stopper = threading.Thread(target=self.engine.stop, name="jaxgen-engine-stop",
                                       daemon=True)
            stopper.start()
            stopper.join(ENGINE_STOP_TIMEOUT_S)
            if stopper.is_alive():
                log.warning("the engine loop did not stop within %gs", ENGINE_STOP_TIMEOUT_S)
            with self._cond:
                self._closing = True
                self._cond.notify()
            sender.join(FLUSH_TIMEOUT_S)

    def _handle(self, batch) -> bool:
        for message in batch:
            if isinstance(message, msg.AddRequest):
                self._add(message)
            elif isinstance(message, msg.AbortRequest):
                self.engine.abort(message.request_id)
            elif isinstance(message, msg.CaptureProfile):
                threading.Thread(target=self._profile, args=(message,), name="jaxgen-profile",
                                 daemon=True).start()
            elif isinstance(message, msg.Stop):
                return False
        return True

    def _add(self, m: msg.AddRequest) -> None:
        try:
            stream = self.engine.add_request(m.prompt_ids, m.params, m.request_id, m.deadline,
                                             m.after, arrival=m.arrival)
        except Exception as e:  # checked by the client already; the engine may have died since
            self.emit(msg.Rejected(m.request_id, f"{type(e).__name__}: {e}",
                                   isinstance(e, QueueFullError)))
            return
        stream.notify(lambda: self._forward(stream))

    def _profile(self, m: msg.CaptureProfile) -> None:
        try:
            directory = self.engine.capture_profile(m.duration_s)
        except Exception as e:
            self.emit(msg.Profiled(m.seq, None, _picklable(e)))
        else:
            self.emit(msg.Profiled(m.seq, directory, None))

    def _send_loop(self) -> None:
        last, sent = None, 0.0
        while True:
            with self._cond:
                if not self._outbox and not self._closing:
                    self._cond.wait(STATS_INTERVAL_S)
                batch, self._outbox = self._outbox, []
                closing = self._closing
            if self.engine.dead is not None and not self._dead_sent:
                self._dead_sent = True
                dead = self.engine.dead
                lost = isinstance(dead, GroupLostError)
                # First: the server is dead (NOT_SERVING) by the time it ends the streams.
                batch.insert(0, msg.Dead(str(dead) if lost else f"{type(dead).__name__}: {dead}",
                                         hung=isinstance(dead, EngineHungError), group_lost=lost))
            stats = self.engine.stats()
            if batch or stats != last or time.monotonic() - sent >= msg.HEARTBEAT_INTERVAL_S:
                try:
                    self.events.send(msg.EventBatch(batch, stats))
                except (OSError, ValueError):  # the server process is gone
                    return
                last, sent = stats, time.monotonic()
            if closing:
                return


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def _exit_with_parent(parent_pid: int) -> None:
    """Ends this process once the server process is gone (re-parented), whatever it is doing
    (e.g. still warming up when the server was killed)."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_WATCH_INTERVAL_S)
        os._exit(0)
    threading.Thread(target=watch, name="jaxgen-parent-watch", daemon=True).start()


def engine_main(config: Config, parent_pid: int, requests, events) -> None:
    """The engine process. Signals are the server's to handle: SIGINT / SIGTERM sent to the
    whole process group are ignored here; the server drains and then stops this process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_with_parent(parent_pid)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("jaxgen").setLevel(config.server.log_level)
    try:
        engine, ready = _build(config)
    except BaseException as e:
        if not isinstance(e, (ValueError, FileNotFoundError)):  # those the CLI prints in a line
            log.exception("the engine process failed to start")
        events.send(msg.Failed(_picklable(e)))
        if config.distributed.enabled:  # not jax.distributed's exit barrier: the others are gone
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return
    core = _EngineCore(engine, events)
    engine.start()
    events.send(ready)
    core.serve(requests)
    # Everything is sent: leave without the interpreter's teardown (JAX's and XLA's exit
    # handlers, threads that may still sit in the runtime), which has nothing left to save.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _build(config: Config):
    import jax

    from jaxgen.build import build_engine

    server = config.server
    if server.profiler_port is not None:
        jax.profiler.start_server(server.profiler_port)
        print(f"jaxgen: profiler server on port {server.profiler_port} (engine process)",
              file=sys.stderr, flush=True)
    engine = build_engine(config)
    tokenizer_dir = tempfile.mkdtemp(prefix="jaxgen-tokenizer-")
    engine.tokenizer.save(tokenizer_dir)
    return engine, msg.Ready(engine.info(), tokenizer_dir, engine.stats())
