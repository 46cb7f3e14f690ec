"""The engine in a process of its own (`jaxgen serve --engine-process`): `EngineClient` in the
server process, `engine_main` in the engine process.

Why: in one process the gRPC front end and the engine loop share one GIL. Under load the
event loop (grpc.aio's completion handling, which runs under the GIL, and the per-message
protobuf work) held the GIL about four times as long as the engine thread (py-spy `--gil`
on the CPU box, docs/benchmarks.md), and every moment the engine thread waits for it is a
moment the device may idle: the 270M shape on an H200 served at 75% of the offline engine,
its step dispatch taking 17 ms instead of 9. With the engine in its own process the two
never contend; the engine process runs exactly the offline engine plus two small threads
that move requests in and outputs out. vLLM (its V1 engine core) and SGLang (its scheduler
process) are split the same way.

What crosses (multiprocessing pipes, pickled lists, one list per wake-up on either side so a
busy engine pays one transfer per step, not one per request):

- server -> engine: `("add", request_id, prompt_ids, params, deadline)`, `("abort", id)`,
  `("profile", seq, duration_s)`, `("stop",)`;
- engine -> server, each list with a `SchedulerStats` snapshot: `("out", RequestOutput)` (text
  already detokenized there, stop strings applied), `("step", step_s, gap_s)`,
  `("launch", drained, launch_s)`, `("rejected", id, message)` (an add the engine refused),
  `("profiled", seq, directory, error)`, `("dead", message)`.

The client checks what it can before queueing (token ids, lengths, the queue bound), so the
caller gets the same exceptions as from `Engine.add_request`; the rare refusal only the engine
can make ends the stream with an error. Observers run in the server process: `on_step` and
`on_launch` as forwarded, `on_finish` when a final output arrives (its end-to-end time measured
here, from `add_request`). If the engine process dies, every open stream ends with an error and
`dead` is set (health NOT_SERVING); if the server process dies, the engine process exits.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid

from jaxgen.engine import EngineObserver, FinishedRequest, check_token_ids
from jaxgen.request_stream import RequestOutput, RequestStream
from jaxgen.scheduler import QueueFullError, SchedulerConfig
from jaxgen.scheduler.scheduler import check_length
from jaxgen.server.stream_bridge import drain

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.25  # an idle engine still reports its counters this often
PARENT_WATCH_INTERVAL_S = 0.5
STOP_TIMEOUT_S = 30.0  # the server's wait for the engine process to exit
ENGINE_STOP_TIMEOUT_S = 15.0  # there: for the engine loop to end its step
FLUSH_TIMEOUT_S = 5.0  # there: for the last outputs to be sent
PROFILE_EXTRA_S = 300.0  # beyond the duration: the pause, JAX's export, the Perfetto copy


@dataclasses.dataclass(frozen=True)
class SchedulerStats:
    """The scheduler's counters as of the last message (what `GetServerStats` and `/metrics`
    read), and its config."""

    config: SchedulerConfig
    num_running: int = 0
    num_waiting: int = 0
    num_free_slots: int = 0
    num_pages_used: int = 0
    num_pages_free: int = 0
    num_preemptions: int = 0
    prefix_cache_query_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    compilations_after_warmup: int = 0

    @classmethod
    def of(cls, engine, config: SchedulerConfig) -> "SchedulerStats":
        s = engine.scheduler
        return cls(config, s.num_running, s.num_waiting, s.num_free_slots, s.num_pages_used,
                   s.num_pages_free, s.num_preemptions, s.prefix_cache_query_tokens,
                   s.prefix_cache_hit_tokens, engine.runner.compilations_after_warmup)


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """What the engine process reports once it is ready to serve."""

    name: str
    model_config: object  # jaxgen.models.ModelConfig
    scheduler_config: SchedulerConfig  # max_waiting: the server's bound (see EngineClient)
    num_pages: int
    warmup_seconds: float | None
    device: str  # e.g. "gpu x1"
    mesh: tuple[tuple[str, int], ...]
    tokenizer_dir: str  # a copy for the server process, removed once it is loaded
    jax_version: str
    stats: SchedulerStats  # as of ready (later ones come with the outputs)


@dataclasses.dataclass(frozen=True)
class _Model:
    config: object


@dataclasses.dataclass(frozen=True)
class RunnerView:
    """The runner attributes the server reads (`ServingModel`, `/metrics`)."""

    model: _Model
    num_pages: int
    compilations_after_warmup: int


@dataclasses.dataclass
class _Pending:
    stream: RequestStream
    prompt_ids: tuple[int, ...]
    arrival: float  # time.monotonic() at add_request


class EngineClient:
    """Starts the engine process (loading the model and warming up, which blocks the caller
    until it is ready) and stands in for its `Engine` in the server: `add_request`, `abort`,
    `stop`, `dead`, `observers`, `tokenizer`, and the `scheduler` / `runner` attributes that
    `ServingModel` and `/metrics` read (as of the engine's last message).

    `args`: the `jaxgen serve` flags (the engine process builds its engine from them as
    in-process serving does). The queue bound: at most `max_waiting + slots` requests held at
    once (with every slot busy, exactly `max_waiting` waiting, as in one process); the engine
    process's own bound is set above that, so it never refuses what was accepted here."""

    def __init__(self, args: argparse.Namespace):
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold a device
        requests_r, self._requests = ctx.Pipe(duplex=False)
        self._events, events_w = ctx.Pipe(duplex=False)
        plain = argparse.Namespace(**{k: v for k, v in vars(args).items() if not callable(v)})
        self._proc = ctx.Process(target=engine_main, args=(plain, os.getpid(), requests_r, events_w),
                                 name="jaxgen-engine", daemon=True)
        self._proc.start()
        requests_r.close()
        events_w.close()
        self.observers: list[EngineObserver] = []
        self.dead: BaseException | None = None
        self._stopping = False
        try:
            self.info = self._await_ready()
        except BaseException:
            self._kill()
            raise
        from jaxgen.tokenizer import load_tokenizer

        try:
            self.tokenizer = load_tokenizer(self.info.tokenizer_dir)
        except BaseException:
            self._kill()
            raise
        finally:
            shutil.rmtree(self.info.tokenizer_dir, ignore_errors=True)
        self.warmup_seconds = self.info.warmup_seconds
        self._capacity = self.info.scheduler_config.max_waiting + self.info.scheduler_config.num_slots
        self._stats = self.info.stats
        self._pending: dict[str, _Pending] = {}
        self._profiles: dict[int, concurrent.futures.Future] = {}
        self._profile_seq = itertools.count()
        self._outbox: list[tuple] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._sender = threading.Thread(target=self._send_loop, name="jaxgen-engine-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive_loop, name="jaxgen-engine-receive",
                                          daemon=True)
        self._sender.start()
        self._receiver.start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def scheduler(self) -> SchedulerStats:
        return self._stats

    @property
    def runner(self) -> RunnerView:
        return RunnerView(_Model(self.info.model_config), self.info.num_pages,
                          self._stats.compilations_after_warmup)

    # -- start-up -----------------------------------------------------------------------------

    def _await_ready(self) -> EngineInfo:
        try:
            message = self._events.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"the engine process exited during start-up (exit code "
                               f"{self._proc.exitcode}); its output above says why") from None
        if message[0] == "failed":
            raise message[1]
        if message[0] != "ready":
            raise RuntimeError(f"the engine process sent {message[0]!r} before 'ready'")
        return message[1]

    # -- requests -----------------------------------------------------------------------------

    def add_request(self, prompt_ids, params, request_id: str | None = None,
                    deadline: float | None = None) -> RequestStream:
        """As `Engine.add_request`: ValueError for bad input, QueueFullError at the bound
        (nothing is queued then), RuntimeError once the engine is dead."""
        if self.dead is not None:
            raise RuntimeError(f"engine is not serving: {type(self.dead).__name__}: {self.dead}")
        request_id = request_id or uuid.uuid4().hex
        prompt_ids = tuple(prompt_ids)
        check_token_ids(prompt_ids, params, self.info.model_config.vocab_size)
        check_length(self.info.scheduler_config, prompt_ids, params)
        with self._lock:
            if request_id in self._pending:
                raise ValueError(f"request_id={request_id!r}: a request with this id is in flight")
            if len(self._pending) >= self._capacity:
                raise QueueFullError(f"waiting queue is full: max_waiting="
                                     f"{self.info.scheduler_config.max_waiting}")
            stream = RequestStream(request_id)
            self._pending[request_id] = _Pending(stream, prompt_ids, time.monotonic())
            self._outbox.append(("add", request_id, prompt_ids, params, deadline))
            self._wake.notify()
        return stream

    def abort(self, request_id: str) -> None:
        """Ends the request at the engine's next step; unknown ids are ignored."""
        with self._lock:
            if request_id in self._pending:
                self._outbox.append(("abort", request_id))
                self._wake.notify()

    def capture_profile(self, duration_s: float) -> str:
        """A profiler trace of the engine process (`ProfileCapture.capture` there, with its
        engine paused at step boundaries to switch the trace); returns its directory. Raises
        what the capture raised there."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self.dead is not None:
                raise RuntimeError(f"engine is not serving: {self.dead}")
            seq = next(self._profile_seq)
            self._profiles[seq] = future
            self._outbox.append(("profile", seq, duration_s))
            self._wake.notify()
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
        `Engine.stop`) and waits for it."""
        with self._lock:
            self._stopping = True
            self._outbox.append(("stop",))
            self._wake.notify()
        self._proc.join(STOP_TIMEOUT_S)
        if self._proc.is_alive():
            log.warning("the engine process did not stop within %gs; killing it", STOP_TIMEOUT_S)
            self._kill()
        self._receiver.join(5)

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

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
            if batch[-1][0] == "stop":
                return

    def _receive_loop(self) -> None:
        try:
            while True:
                events, stats = self._events.recv()
                self._stats = stats
                for event in events:
                    try:
                        self._handle(event)
                    except Exception:  # one bad event must not stop the others
                        log.exception("engine event %r failed", event[0])
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("reading the engine process failed")
        self._engine_gone()

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "out":
            self._deliver(event[1])
        elif kind == "step":
            self._notify("on_step", event[1], event[2])
        elif kind == "launch":
            self._notify("on_launch", event[1], event[2])
        elif kind == "rejected":
            self._deliver(RequestOutput(event[1], (), "", None, "error", event[2]))
        elif kind == "profiled":
            with self._lock:
                future = self._profiles.get(event[1])
            if future is not None and not future.done():
                if event[3] is None:
                    future.set_result(event[2])
                else:
                    future.set_exception(event[3])
        elif kind == "dead":
            self.dead = RuntimeError(event[1])
        else:
            log.error("unknown engine event %r", kind)

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            pending = (self._pending.pop(out.request_id, None) if out.finished
                       else self._pending.get(out.request_id))
        if pending is None:
            return
        if out.finished:  # observers first, as the engine does: the caller may exit after it
            self._notify("on_finish", FinishedRequest(out, pending.prompt_ids,
                                                      time.monotonic() - pending.arrival))
        pending.stream.put(out)

    def _notify(self, method: str, *args) -> None:
        for observer in self.observers:
            try:
                getattr(observer, method)(*args)
            except Exception:
                log.exception("engine observer %r failed in %s", observer, method)

    def _engine_gone(self) -> None:
        """The engine process's pipe closed: if unasked, the engine is dead; either way every
        request still open ends with an error (nothing is left to answer it)."""
        self._proc.join(1)
        detail = f"the engine process exited (exit code {self._proc.exitcode})"
        if not self._stopping and self.dead is None:
            log.error("%s", detail)
            self.dead = RuntimeError(detail)
        with self._lock:
            open_ids = list(self._pending)
            profiles = list(self._profiles.values())
        for future in profiles:
            if not future.done():
                future.set_exception(RuntimeError(detail))
        for request_id in open_ids:
            self._deliver(RequestOutput(request_id, (), "", None, "error", detail))


# -- the engine process ------------------------------------------------------------------------

class _Forward(EngineObserver):
    def __init__(self, core: "_EngineCore"):
        self.core = core

    def on_step(self, step_seconds, host_gap_seconds):
        self.core.emit(("step", step_seconds, host_gap_seconds))

    def on_launch(self, device_drained, launch_seconds):
        self.core.emit(("launch", device_drained, launch_seconds))


class _EngineCore:
    """The engine process's side: requests in on the main thread, outputs out on a sender."""

    def __init__(self, engine, scheduler_config: SchedulerConfig, profiles, events):
        self.engine, self.profiles, self.events = engine, profiles, events
        self.config = scheduler_config
        self._outbox: list[tuple] = []
        self._cond = threading.Condition()
        self._closing = False
        self._dead_sent = False
        engine.observers.append(_Forward(self))

    def emit(self, event: tuple) -> None:
        with self._cond:
            self._outbox.append(event)
            self._cond.notify()

    def _forward(self, stream: RequestStream) -> None:
        """The stream's wake-up (on the engine thread): its outputs to the outbox, in order
        (drained under the outbox's lock, so two wake-ups cannot interleave them)."""
        with self._cond:
            self._outbox += [("out", out) for out in drain(stream)]
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
            # Bounded: a loop stuck in a device call must not keep the process alive (the
            # server kills it after STOP_TIMEOUT_S anyway, with no word of why).
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
            kind = message[0]
            if kind == "add":
                self._add(*message[1:])
            elif kind == "abort":
                self.engine.abort(message[1])
            elif kind == "profile":
                threading.Thread(target=self._profile, args=message[1:], name="jaxgen-profile",
                                 daemon=True).start()
            elif kind == "stop":
                return False
        return True

    def _add(self, request_id, prompt_ids, params, deadline) -> None:
        try:
            stream = self.engine.add_request(prompt_ids, params, request_id, deadline)
        except Exception as e:  # checked by the client already; the engine may have died since
            self.emit(("rejected", request_id, f"{type(e).__name__}: {e}"))
            return
        stream.notify(lambda: self._forward(stream))

    def _profile(self, seq: int, duration_s: float) -> None:
        try:
            directory = self.profiles.capture(duration_s, self.engine.quiesced)
        except Exception as e:
            self.emit(("profiled", seq, None, _picklable(e)))
        else:
            self.emit(("profiled", seq, directory, None))

    def _send_loop(self) -> None:
        last = None
        while True:
            with self._cond:
                if not self._outbox and not self._closing:
                    self._cond.wait(STATS_INTERVAL_S)
                batch, self._outbox = self._outbox, []
                closing = self._closing
            if self.engine.dead is not None and not self._dead_sent:
                self._dead_sent = True
                batch.append(("dead", f"{type(self.engine.dead).__name__}: {self.engine.dead}"))
            stats = SchedulerStats.of(self.engine, self.config)
            if batch or stats != last:
                try:
                    self.events.send((batch, stats))
                except (OSError, ValueError):  # the server process is gone
                    return
                last = stats
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


def engine_main(args, parent_pid: int, requests, events) -> None:
    """The engine process: builds the engine from the `serve` flags exactly as in-process
    serving does (checkpoint, mesh, warm-up), reports `EngineInfo`, then serves the pipe
    until told to stop or the server process goes away. Signals are the server's to handle:
    SIGINT / SIGTERM sent to the whole process group are ignored here, the server drains and
    then stops this process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_with_parent(parent_pid)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("jaxgen").setLevel(args.log_level)
    try:
        engine, info, profiles = _build(args)
    except BaseException as e:
        if not isinstance(e, (ValueError, FileNotFoundError)):  # those the CLI prints in a line
            log.exception("the engine process failed to start")
        events.send(("failed", _picklable(e)))
        return
    core = _EngineCore(engine, info.scheduler_config, profiles, events)
    engine.start()
    events.send(("ready", info))
    core.serve(requests)
    # Everything is sent: leave without the interpreter's teardown (JAX's and XLA's exit
    # handlers, threads that may still sit in the runtime), which has nothing left to save. A
    # stopped engine process once outlived the server's 30 s wait in CI (2-core box; which
    # step held it was not seen): every step of the stop is now bounded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _build(args):
    import jax

    from jaxgen.cli import build_engine, load_model
    from jaxgen.profiling import ProfileCapture

    if args.profiler_port is not None:
        jax.profiler.start_server(args.profiler_port)
        print(f"jaxgen: profiler server on port {args.profiler_port} (engine process)",
              file=sys.stderr, flush=True)
    loaded, mesh = load_model(args)
    # Above the server's bound (see EngineClient): the server refuses first.
    engine = build_engine(args, loaded, 0, mesh=mesh, warmup=True,
                          max_waiting=args.max_waiting + args.slots)
    tokenizer_dir = tempfile.mkdtemp(prefix="jaxgen-tokenizer-")
    loaded.tokenizer.save(tokenizer_dir)
    axes = tuple(mesh.shape.items()) if mesh is not None else (("data", 1), ("model", 1))
    devices = mesh.devices.size if mesh is not None else 1
    config = dataclasses.replace(engine.scheduler.config, max_waiting=args.max_waiting)
    info = EngineInfo(
        name=loaded.config.name or os.path.basename(loaded.source.rstrip("/")),
        model_config=loaded.model.config, scheduler_config=config,
        num_pages=engine.runner.num_pages, warmup_seconds=engine.warmup_seconds,
        device=f"{jax.devices()[0].platform} x{devices}", mesh=axes,
        tokenizer_dir=tokenizer_dir, jax_version=jax.__version__,
        stats=SchedulerStats.of(engine, config))
    return engine, info, ProfileCapture(args.profile_dir)
