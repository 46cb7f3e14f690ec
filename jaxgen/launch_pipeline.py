"""`LaunchPipeline`: the engine's device steps between launch and update.

A plan is launched (dispatched to the device, not waited for), inline or from a launcher thread
(`EngineConfig.overlap_launch`), which dispatches in launch order; steps are read oldest first,
and the engine may launch the next step before reading the one in flight, so host work overlaps
device work. A failed launch or read becomes events: the requests of every step in flight end
with "error" and the engine goes on, unless the device is lost (`ModelRunner.device_lost`), when
every request ends and the pipeline reports it (`lost`). Observers are told each step's time,
the host gap before it, and for steps launched ahead, the dispatch time and whether the device
ran dry meanwhile.

Over several processes (`group`, process 0's `Leader`) each plan is sent to the others just
before it is dispatched here, in launch order; a failed step then stops the whole group (the
processes' device states may no longer agree), naming a lost process if that was the cause.

Knows the runner, the scheduler (to end requests of a failed step) and the engine's lock (held
for scheduler calls only, never across a device call); nothing of text or streams.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time

import jax

from jaxgen.engine_api import Observers
from jaxgen.runtime.runner import ModelRunner
from jaxgen.scheduler import RequestEvent, Scheduler, StepPlan

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _InFlight:
    """A launched step: its plan and its dispatch, resolved (inline) or pending (launcher
    thread) to `(LaunchedStep, drained, dispatch seconds)`."""

    plan: StepPlan
    dispatch: concurrent.futures.Future
    start: float  # time.perf_counter() when it was handed to the dispatch


class LaunchPipeline:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, lock: threading.Lock,
                 observers: Observers, overlap_launch: bool = False, group=None):
        self.runner, self.scheduler, self._lock, self._observers = runner, scheduler, lock, observers
        self._group = group
        self._steps: list[_InFlight] = []  # oldest first
        self._launcher = (concurrent.futures.ThreadPoolExecutor(1, "jaxgen-launch")
                          if overlap_launch else None)
        self._failed: list[RequestEvent] = []  # final events of requests a failed step ended
        self._last_read: float | None = None  # when the last step's tokens reached the host
        self.lost: BaseException | None = None  # set when a failure lost the device state

    @property
    def in_flight(self) -> int:
        return len(self._steps)

    def launch(self, plan: StepPlan) -> None:
        """Dispatches `plan` without waiting for it: inline, or queued to the launcher thread."""
        previous = self._steps[-1].dispatch if self._steps and self._observers else None
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
        self._steps.append(_InFlight(plan, dispatch, start))

    def update_oldest(self) -> list[RequestEvent]:
        """Waits for the oldest step's tokens and folds them into the scheduler; its events (none
        when it failed: the failure's events come from `take_failed`)."""
        step = self._steps.pop(0)
        try:
            launched, drained, dispatch_seconds = step.dispatch.result()
            if drained is not None:
                self._observers.notify("on_launch", drained, dispatch_seconds)
            output = self.runner.collect(launched)
        except Exception as e:
            self._fail(step.plan, e)  # ends the requests of every launched step
            return []
        self._observe(step.start, time.perf_counter())
        with self._lock, jax.profiler.TraceAnnotation("jaxgen.update"):
            events = self.scheduler.update(launched.plan, output)
            verified = self.scheduler.take_verified()
        for drafts, accepted in verified:
            self._observers.notify("on_drafts", drafts, accepted)
        return events

    def take_failed(self) -> list[RequestEvent]:
        failed, self._failed = self._failed, []
        return failed

    def idle(self) -> None:
        """The engine waits for work: the next step's host gap is not measured from the last."""
        self._last_read = None

    def shutdown(self, wait: bool = True) -> None:
        if self._launcher is not None:
            self._launcher.shutdown(wait=wait)

    def _dispatch(self, plan, previous):
        """`runner.launch(plan)`; with `previous` (the step before it, observed), whether that
        one had already finished on device once this dispatch returned: if so the device ran
        dry during host work (dispatch included), and the host set the pace."""
        start = time.perf_counter()
        if self._group is not None:
            self._group.send(plan)
        launched = self.runner.launch(plan)
        drained = None if previous is None else _finished(previous)
        return launched, drained, time.perf_counter() - start

    def _observe(self, start: float, end: float) -> None:
        gap = None if self._last_read is None else max(start - self._last_read, 0.0)
        self._last_read = end  # a step launched ahead, before the previous was read: gap 0
        self._observers.notify("on_step", end - start, gap)

    def _fail(self, plan: StepPlan, e: Exception) -> None:
        """A device step failed: its requests, and those of every step launched with it, end
        with "error", not the engine; a lost device ends every request and sets `lost`."""
        log.exception("step %d failed on device", plan.step)
        detail = f"device step failed: {type(e).__name__}: {e}"
        if self._group is not None:  # never returns
            self._group.step_failed(f"step {plan.step} failed on process 0: {detail}")
        # Queued dispatches finish first (failing or not): the runner's state is then ours.
        concurrent.futures.wait([step.dispatch for step in self._steps])
        lost = self.runner.device_lost()
        if lost:  # pools/state gone or poisoned, or the device dead: nothing can run any more
            self.lost = e
        plans = [plan] + [step.plan for step in self._steps]
        self._steps.clear()
        with self._lock:
            self.scheduler.abandon_in_flight()
            ids = {c.request_id for p in plans for c in p.prefills}
            ids |= set(self.scheduler.running_ids())
            if lost:
                ids |= set(self.scheduler.waiting_ids())
            self._failed += [self.scheduler.finish(i, "error", detail)
                             or RequestEvent(i, finish_reason="error", detail=detail)
                             for i in sorted(ids)]


def _finished(dispatch: concurrent.futures.Future) -> bool:
    """Whether the step of `dispatch` has finished on device. Only a metric: a step whose
    dispatch failed, or whose outputs are gone after a device error, reads as not."""
    try:
        return dispatch.result()[0].done()
    except Exception:
        return False
