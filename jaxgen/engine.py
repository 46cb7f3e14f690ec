"""The engine: one model, one page pool, many concurrent requests.

Owns the `Scheduler` (host, no jax) and the `ModelRunner` (device). `step()` is plan ->
execute -> update; `_deliver` turns the scheduler's token events into streamed outputs (text via
the incremental detokenizer, stop strings matched on text and never streamed past). A background
loop thread calls `step()` while there is work. The scheduler is the only state shared with
caller threads, behind one lock held only for host bookkeeping, never across a device call.
An exception in one request's handling ends that request with finish_reason "error"; a failed
device step fails the requests in that plan; the loop keeps serving either way.

Observers (`engine.observers`, e.g. jaxgen.metrics and jaxgen.request_log) are told each step's
device time and the host gap before it, and each request's final output; the engine imports
neither prometheus nor any logging policy of theirs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
import uuid

import jax

from jaxgen.request_stream import Completion, RequestOutput, RequestStream
from jaxgen.runtime.runner import ModelRunner, RunnerConfig
from jaxgen.sampling_params import SamplingParams
from jaxgen.scheduler import QueueFullError, RequestEvent, Scheduler, SchedulerConfig, StepPlan
from jaxgen.tokenizer.detokenizer import IncrementalDetokenizer
from jaxgen.tokenizer.stop_strings import StopStringMatcher

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineConfig", "EngineObserver", "FinishedRequest", "QueueFullError",
           "check_token_ids"]


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    runner: RunnerConfig = RunnerConfig()
    max_waiting: int = 1024  # bound of the waiting queue: past it add_request raises QueueFullError
    enable_prefix_cache: bool = True
    warmup: bool = True  # compile every shape at start
    # Dispatch steps from a launcher thread, so the host's update, text and planning of one
    # step overlap the dispatch of the next. XLA GPU launches a step's kernels on the thread
    # that calls it (the GIL released): 9 ms per step offline, 17 ms serving, for the Gemma 3
    # 270M shape at 64 slots x 16 decode steps on an H200, where 93% of the steps found the
    # device drained when their dispatch returned (docs/benchmarks.md).
    overlap_launch: bool = False


def check_token_ids(prompt_ids, params: SamplingParams, vocab: int) -> None:
    """Raises ValueError naming the first prompt or stop token id outside [0, vocab)."""
    bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad}: outside the vocabulary [0, {vocab})")
    for i, t in enumerate(params.stop_token_ids):
        if not 0 <= t < vocab:
            raise ValueError(f"stop_token_ids[{i}]={t}: outside the vocabulary [0, {vocab})")


@dataclasses.dataclass
class _Live:
    """Engine-side state of one request: its stream and text pipeline."""

    stream: RequestStream
    params: SamplingParams
    detok: IncrementalDetokenizer
    stop: StopStringMatcher
    prompt_ids: tuple[int, ...]
    arrival: float  # time.monotonic() at add_request


@dataclasses.dataclass(frozen=True)
class _InFlight:
    """A launched step: its plan and its dispatch, resolved (inline) or pending (launcher
    thread) to `(LaunchedStep, drained, dispatch seconds)`."""

    plan: StepPlan
    dispatch: concurrent.futures.Future
    start: float  # time.perf_counter() when it was handed to the dispatch


@dataclasses.dataclass(frozen=True)
class FinishedRequest:
    """A request's final output, as observers see it."""

    output: RequestOutput  # finish_reason, detail and usage set
    prompt_ids: tuple[int, ...]
    e2e_seconds: float  # add_request -> final output


class EngineObserver:
    """Told what the engine does; methods run on the engine thread and must be quick. An
    exception in one is logged and ignored."""

    def on_step(self, step_seconds: float, host_gap_seconds: float | None) -> None:
        """`step_seconds`: one step, from its launch to its tokens on host; `host_gap_seconds`:
        from the previous step's tokens on host to this step's launch (0 when it was launched
        ahead, before them), None after an idle wait."""

    def on_launch(self, device_drained: bool, launch_seconds: float) -> None:
        """A step was launched while others were in flight (told when its tokens are read);
        `device_drained`: by the time its dispatch returned, the device had finished all of
        them, so it sat idle for part of the host's work on this launch (the host set the pace;
        the host gap reads 0 for such a step, since it was launched before the previous step's
        tokens were read); `launch_seconds`: the dispatch itself (uploads and jit calls, which
        on GPU launch the step's kernels)."""

    def on_finish(self, finished: FinishedRequest) -> None:
        """A request ended (any finish reason)."""


class Engine:
    def __init__(self, model, params, tokenizer, config: EngineConfig = EngineConfig(), mesh=None):
        self.tokenizer = tokenizer
        self.config = config
        self.runner = ModelRunner(model, params, config.runner, mesh=mesh)
        rc = config.runner
        self.scheduler = Scheduler(SchedulerConfig(
            num_slots=rc.num_slots, num_pages=self.runner.num_pages, page_size=rc.page_size,
            max_model_len=rc.max_model_len, max_waiting=config.max_waiting,
            max_prefill_tokens=rc.max_prefill_tokens, decode_steps=rc.decode_steps,
            model_stop_ids=frozenset(tokenizer.stop_ids),
            enable_prefix_cache=config.enable_prefix_cache))
        self._live: dict[str, _Live] = {}
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._seeds = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._pauses = 0  # quiesced() callers waiting or inside
        self._quiet = threading.Event()  # set while the loop is paused with nothing in flight
        # Set when the engine can no longer serve (loop crashed, device lost): health
        # reports NOT_SERVING and add_request refuses.
        self.dead: BaseException | None = None
        self.observers: list[EngineObserver] = []
        self._launched: list[_InFlight] = []  # oldest first
        self._launcher = (concurrent.futures.ThreadPoolExecutor(1, "jaxgen-launch")
                          if config.overlap_launch else None)
        self._failed: list[RequestEvent] = []  # final events of requests a failed step ended
        self._last_execute_end: float | None = None  # for the host gap; None after idling
        self.warmup_seconds: float | None = None
        if config.warmup:
            start = time.perf_counter()
            self.runner.warmup()
            self.warmup_seconds = time.perf_counter() - start
            log.info("warm-up compiled in %.1fs", self.warmup_seconds)

    # -- requests -----------------------------------------------------------------------------

    def add_request(self, prompt_ids, params: SamplingParams, request_id: str | None = None,
                    deadline: float | None = None) -> RequestStream:
        """Queues a request; returns its stream. Raises ValueError for bad input and
        QueueFullError when the waiting queue is at its bound (nothing is queued then)."""
        if self.dead is not None:
            raise RuntimeError(f"engine is not serving: {type(self.dead).__name__}: {self.dead}")
        request_id = request_id or uuid.uuid4().hex
        check_token_ids(prompt_ids, params, self.runner.model.config.vocab_size)
        seed = params.seed if params.seed is not None else next(self._seeds)
        stream = RequestStream(request_id)
        with self._work:
            self.scheduler.add(request_id, list(prompt_ids), params, seed, deadline)
            self._live[request_id] = _Live(
                stream, params, IncrementalDetokenizer(self.tokenizer, prompt_ids),
                StopStringMatcher(params.stop), tuple(prompt_ids), time.monotonic())
            self._work.notify()
        return stream

    def abort(self, request_id: str) -> None:
        """Ends the request at the next step (slot and pages freed); unknown ids are ignored."""
        with self._work:
            if request_id in self._live:
                self.scheduler.abort(request_id)
                self._work.notify()

    # -- the loop -----------------------------------------------------------------------------

    def step(self) -> bool:
        """One engine step: plan -> execute -> update. The device is kept fed: the next step
        is launched before this one's tokens are read (`Scheduler.schedule_ahead`) unless an
        abort or deadline is due, and then it is planned and launched before this one's tokens
        become text and stream out. False when there was nothing to do."""
        if not self._launched:
            events = self._plan_and_launch()
            if not self._launched:  # nothing to do, or its launch failed
                events += self._take_failed()
                self._deliver(events)
                return bool(events)
        self._launch(self._plan_ahead())
        events = self._update_oldest() if self._launched else []  # [] if that launch failed
        if not self._launched:
            events += self._plan_and_launch()
        self._deliver(events + self._take_failed())
        return True

    def _plan_and_launch(self) -> list[RequestEvent]:
        """Plans a step and launches it unless it is empty; returns the final events an empty
        plan's aborts and expiries produced (a plan with work reports them at its update)."""
        with self._lock, jax.profiler.TraceAnnotation("jaxgen.schedule"):
            plan = self.scheduler.schedule()
            events = self.scheduler.take_finished_events() if plan.empty else []
        if not plan.empty:
            self._launch(plan)
        return events

    def _plan_ahead(self):
        if not self._launched:
            return None
        with self._lock, jax.profiler.TraceAnnotation("jaxgen.schedule"):
            return self.scheduler.schedule_ahead()

    def _launch(self, plan) -> None:
        """Dispatches `plan` (None: nothing) without waiting for it: inline, or queued to the
        launcher thread (`EngineConfig.overlap_launch`), which dispatches in launch order."""
        if plan is None:
            return
        previous = self._launched[-1].dispatch if self._launched and self.observers else None
        start = time.perf_counter()
        if self._launcher is not None:
            dispatch = self._launcher.submit(self._dispatch, plan, previous)
        else:
            dispatch = concurrent.futures.Future()
            try:
                dispatch.set_result(self._dispatch(plan, previous))
            except Exception as e:
                self._fail(plan, e)
                return
        self._launched.append(_InFlight(plan, dispatch, start))

    def _dispatch(self, plan, previous):
        """`runner.launch(plan)`; with `previous` (the step before it, observed), whether that
        one had already finished on device once this dispatch returned: if so the device ran
        dry during host work (dispatch included), and the host set the pace."""
        start = time.perf_counter()
        launched = self.runner.launch(plan)
        drained = None if previous is None else self._finished(previous)
        return launched, drained, time.perf_counter() - start

    @staticmethod
    def _finished(dispatch: concurrent.futures.Future) -> bool:
        """Whether the step of `dispatch` has finished on device. Only a metric: a step whose
        dispatch failed, or whose outputs are gone after a device error, reads as not."""
        try:
            return dispatch.result()[0].done()
        except Exception:
            return False

    def _update_oldest(self) -> list[RequestEvent]:
        """Waits for the oldest launched step's tokens and folds them into the scheduler (no
        events when it failed: `_fail` ends its requests)."""
        step = self._launched.pop(0)
        try:
            launched, drained, dispatch_seconds = step.dispatch.result()
            if drained is not None:
                self._notify("on_launch", drained, dispatch_seconds)
            output = self.runner.collect(launched)
        except Exception as e:
            self._fail(step.plan, e)  # ends the requests of every launched step
            return []
        self._observe_step(step.start, time.perf_counter())
        with self._lock, jax.profiler.TraceAnnotation("jaxgen.update"):
            return self.scheduler.update(launched.plan, output)

    def _take_failed(self) -> list[RequestEvent]:
        failed, self._failed = self._failed, []
        return failed

    def _fail(self, plan, e: Exception) -> None:
        """A device step failed: its requests (and those of every step launched with it) end
        with "error", not the engine; a lost device (`ModelRunner.device_lost`) ends everything
        (engine dead)."""
        log.exception("step %d failed on device", plan.step)
        detail = f"device step failed: {type(e).__name__}: {e}"
        # Queued dispatches finish first (failing or not): the runner's state is then ours.
        concurrent.futures.wait([step.dispatch for step in self._launched])
        lost = self.runner.device_lost()
        if lost:  # pools/state gone or poisoned, or the device dead: nothing can run any more
            self.dead = e
        plans = [plan] + [step.plan for step in self._launched]
        self._launched.clear()
        with self._lock:
            self.scheduler.abandon_in_flight()
            ids = {c.request_id for p in plans for c in p.prefills}
            ids |= set(self.scheduler.running_ids())
            if lost:
                ids |= set(self._live)
            self._failed += [self.scheduler.finish(i, "error", detail)
                             or RequestEvent(i, finish_reason="error", detail=detail)
                             for i in sorted(ids)]

    def _observe_step(self, start: float, end: float) -> None:
        gap = None if self._last_execute_end is None else start - self._last_execute_end
        if gap is not None:
            gap = max(gap, 0.0)  # launched ahead, before the previous step was read: no gap
        self._last_execute_end = end
        self._notify("on_step", end - start, gap)

    def _notify(self, method: str, *args) -> None:
        for observer in self.observers:
            try:
                getattr(observer, method)(*args)
            except Exception:  # an observer must never take the engine down
                log.exception("engine observer %r failed in %s", observer, method)

    def _deliver(self, events) -> None:
        for ev in events:
            live = self._live.get(ev.request_id)
            if live is None:
                continue
            try:
                self._deliver_one(live, ev)
            except Exception as e:  # isolate: this request fails, the others go on
                log.exception("request %s failed while delivering output", ev.request_id)
                detail = f"{type(e).__name__}: {e}"
                with self._lock:
                    final = self.scheduler.finish(ev.request_id, "error", detail)
                self._close(ev.request_id, RequestOutput(
                    ev.request_id, (), "", None, "error", detail, final.usage if final else None))

    def _deliver_one(self, live: _Live, ev) -> None:
        ids = list(ev.token_ids)
        text_ids = ids
        if ev.finish_reason == "stop" and ids and ids[-1] in live.params.stop_ids(self.tokenizer.stop_ids):
            text_ids = ids[:-1]  # the stop token itself is not text
        emit, matched = live.stop.feed(live.detok.push(text_ids))
        finish, detail, usage = ev.finish_reason, ev.detail, ev.usage
        if matched is not None and finish is None:
            with self._lock:
                final = self.scheduler.finish(ev.request_id, "stop", f"stop string {matched!r}")
            finish, detail = "stop", f"stop string {matched!r}"
            usage = final.usage if final is not None else None
        elif finish is not None and matched is None:
            emit += live.stop.feed(live.detok.flush())[0] + live.stop.flush()
        out = RequestOutput(ev.request_id, tuple(ids), emit, ev.logprobs, finish, detail, usage)
        if finish is None:
            live.stream.put(out)
        else:
            self._close(ev.request_id, out)

    def _close(self, request_id: str, out: RequestOutput) -> None:
        live = self._live.pop(request_id, None)
        if live is not None:
            # Observers first: once a caller holds the final output, the request is counted
            # and logged (a draining server may exit as soon as its last stream ends).
            self._notify("on_finish", FinishedRequest(out, live.prompt_ids,
                                                      time.monotonic() - live.arrival))
            live.stream.put(out)

    def has_work(self) -> bool:
        with self._lock:
            return self.scheduler.has_work()

    def start(self) -> None:
        """Runs `step()` on a background thread whenever there is work."""
        self._thread = threading.Thread(target=self._loop, name="jaxgen-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._work:
            self._stopping = True
            self._work.notify()
        if self._thread is not None:
            self._thread.join()
        if self._launcher is not None:
            self._launcher.shutdown(wait=True)

    @contextlib.contextmanager
    def quiesced(self, timeout_s: float = 60.0):
        """Pauses the loop at a step boundary with nothing in flight (every launched step read,
        so the device is idle) for the body of the `with`; serving resumes after it. For work
        that must not overlap device execution, e.g. starting or stopping a profiler trace.
        Without a loop thread (offline use) the caller's thread reads the launched steps; once
        the loop has ended (stopped or dead) nothing is launched and nobody waits. Raises
        TimeoutError if the loop does not reach a step boundary within `timeout_s`."""
        with self._work:
            self._pauses += 1
            self._work.notify_all()
        try:
            if self._thread is not None and self._thread.is_alive():
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

    def _drain(self) -> None:
        """Reads every launched step (their tokens are delivered as usual)."""
        while self._launched:
            events = self._update_oldest()
            self._deliver(events + self._take_failed())

    def _loop(self) -> None:
        try:
            while True:
                with self._work:
                    while not self._stopping and (self._pauses or not self.scheduler.has_work()):
                        if self._pauses and self._launched:
                            break  # drain first, outside the lock
                        if self._pauses:
                            self._quiet.set()
                        self._last_execute_end = None  # an idle wait is not a host gap
                        self._work.wait()
                    if self._stopping:
                        return
                    pausing = bool(self._pauses)
                if pausing:
                    self._drain()
                else:
                    self.step()
                if self.dead is not None:
                    return
        except BaseException as e:  # the loop must never die silently: health reads `dead`
            log.exception("engine loop crashed")
            self.dead = e
            raise
        finally:  # no step will be launched any more: a quiesced() caller need not wait
            self._quiet.set()

    # -- offline ------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Runs every prompt to completion (continuous batching, this thread) and returns the
        completions in prompt order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        pending = list(zip(prompts, params_list))[::-1]
        streams, ours = [], set()
        # Ours still running: checked over the engine's live requests (at most slots + the
        # waiting bound), not over every stream of the call, at each step.
        while pending or any(request_id in ours for request_id in self._live):
            while pending:  # keep the waiting queue full, never past its bound
                try:
                    streams.append(self.add_request(*pending[-1]))
                except QueueFullError:
                    break
                ours.add(streams[-1].request_id)
                pending.pop()
            if not self.step() and not self.has_work():
                raise RuntimeError("engine has unfinished requests but nothing to schedule")
        return [s.result() for s in streams]
