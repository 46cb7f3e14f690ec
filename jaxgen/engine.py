"""The engine: one model, one page pool, many concurrent requests (`EngineSurface`).

Owns the `Scheduler` (host, no jax), the `ModelRunner` (device) and the `LaunchPipeline`
between them. `step()` is plan -> execute -> update; the requests' token events then become
streamed outputs (text via `RequestText`: incremental detokenizer, stop strings never streamed
past). A loop thread (`EngineLoop`) calls `step()` while there is work. The scheduler is the only
state shared with caller threads, behind one lock held only for host bookkeeping, never across a
device call. An exception in one request's handling ends that request with finish_reason
"error"; a failed device step fails the requests in flight; the loop keeps serving either way,
unless the device is lost (then the engine is `dead`).

Observers (`engine.observers`, e.g. jaxgen.metrics and jaxgen.request_log) are told each step's
device time and the host gap before it, and each request's final output; the engine imports
neither prometheus nor any logging policy of theirs.

Over several processes (`group`: jaxgen.distributed's `Leader`, on process 0) the engine is the
same: every plan goes to the other processes before it runs here, a lost process makes the
engine dead and ends its requests UNAVAILABLE, and `stop()` stops the other processes too.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid

import jax

from jaxgen.config import DEFAULT_PROFILE_DIR, EngineConfig
from jaxgen.engine_api import (EngineDeadError, EngineHungError, EngineInfo, EngineStats,
                               GroupLostError, Observers, OpenRequests, QueueFullError,
                               check_request)
from jaxgen.engine_loop import EngineLoop
from jaxgen.launch_pipeline import LaunchPipeline
from jaxgen.request_stream import ENGINE_UNAVAILABLE, Completion, RequestOutput, RequestStream
from jaxgen.runtime.runner import ModelRunner
from jaxgen.sampling_params import SamplingParams
from jaxgen.scheduler import RequestEvent, Scheduler
from jaxgen.scheduler.config import scheduler_config
from jaxgen.tokenizer.request_text import RequestText

log = logging.getLogger(__name__)

STOP_DEAD_TIMEOUT_S = 5.0  # stop(): a dead engine's loop may be stuck in a device call

__all__ = ["Engine"]


class Engine:
    restarting = None  # the surface's: an engine on a thread is never restarted

    def __init__(self, model, params, tokenizer, config: EngineConfig = EngineConfig(), mesh=None,
                 *, name: str = "", profile_dir: str | None = None, group=None):
        self.tokenizer = tokenizer
        self.config = config = config.resolved(model.config.max_position_embeddings)
        self.group = group
        self.runner = ModelRunner(model, params, config, mesh=mesh,
                                  sync_dispatch=group is not None and group.sync_dispatch)
        self.warmup_seconds: float | None = None
        self.verify_cost: float | None = None  # speculative decoding: see scheduler_config
        # Off without warm-up unless asked for: steps would compile, for as long as they take.
        self.step_timeout_s = config.step_timeout_s or None
        if config.warmup:
            start = time.perf_counter()
            self.verify_cost = self.runner.warmup()
            self.warmup_seconds = time.perf_counter() - start
            self.step_timeout_s = config.step_timeout(self.runner.slowest_warmup_s)
            log.info("warm-up compiled in %.1fs", self.warmup_seconds)
            if self.verify_cost is not None:
                log.info("a one-request verify step costs %.2f decode tokens", self.verify_cost)
            if group is not None:  # the others warmed up alike: no step compiles any more
                group.steady()
        self.scheduler = Scheduler(scheduler_config(config, self.runner.num_pages,
                                                    tokenizer.stop_ids, self.verify_cost))
        self.observers = Observers()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._pipeline = LaunchPipeline(self.runner, self.scheduler, self._lock, self.observers,
                                        config.overlap_launch, group)
        self._open = OpenRequests(self.observers)
        if group is not None:
            group.on_lost(self._lose)
        self._text: dict[str, RequestText] = {}
        self._seeds = itertools.count(1)
        self._loop = EngineLoop(  # step and drain looked up per call: tests replace them
            self._work, step=lambda: self.step(), drain=lambda: self._drain(),
            has_work=self.scheduler.has_work,
            in_flight=lambda: self._pipeline.in_flight, idle=self._pipeline.idle,
            dead=lambda: self.dead is not None, on_crash=self._crashed)
        self._profile_dir = profile_dir
        self._profiles = None
        self.dead: BaseException | None = None  # set when the engine can no longer serve
        self._info = self._describe(name or model.config.name or model.config.architecture, mesh)

    # -- the surface --------------------------------------------------------------------------

    def add_request(self, prompt_ids, params: SamplingParams, request_id: str | None = None,
                    deadline: float | None = None, after: str | None = None, *,
                    arrival: float | None = None) -> RequestStream:
        """Queues a request; returns its stream. Raises RequestError for bad input,
        QueueFullError at the waiting bound (nothing is queued then), EngineDeadError.
        `after`: another request of the same prompt, prefilled first (see `add_choices`).
        `arrival`: time.monotonic() of its first arrival, when that was earlier (a request kept
        across an engine restart: its wait counts as queue time)."""
        if self.dead is not None:
            raise EngineDeadError(f"engine is not serving: {type(self.dead).__name__}: {self.dead}")
        request_id = request_id or uuid.uuid4().hex
        check_request(self._info, prompt_ids, params)
        seed = params.seed if params.seed is not None else next(self._seeds)
        with self._work:
            self.scheduler.add(request_id, list(prompt_ids), params, seed, deadline, after, arrival)
            stream = self._open.open(request_id, prompt_ids)
            self._text[request_id] = RequestText(self.tokenizer, prompt_ids, params.stop,
                                                 params.stop_ids(self.tokenizer.stop_ids))
            self._work.notify()
        return stream

    def abort(self, request_id: str) -> None:
        """Ends the request at the next step (slot and pages freed); unknown ids are ignored."""
        with self._work:
            if request_id in self._open:
                self.scheduler.abort(request_id)
                self._work.notify()

    def info(self) -> EngineInfo:
        return self._info

    def stats(self) -> EngineStats:
        with self._lock:
            s = self.scheduler
            compilations = self.runner.compilations_after_warmup + (
                self.group.worker_compilations if self.group is not None else 0)
            return EngineStats(
                num_running=s.num_running, num_waiting=s.num_waiting,
                num_free_slots=s.num_free_slots, num_pages_used=s.num_pages_used,
                num_pages_free=s.num_pages_free, num_preemptions=s.num_preemptions,
                num_displaced=s.num_displaced, num_queue_timeouts=s.num_queue_timeouts,
                prefix_cache_query_tokens=s.prefix_cache_query_tokens,
                prefix_cache_hit_tokens=s.prefix_cache_hit_tokens,
                compilations_after_warmup=compilations)

    def capture_profile(self, duration_s: float) -> str:
        from jaxgen.profiling import ProfileCapture

        if self._profiles is None:
            self._profiles = ProfileCapture(self._profile_dir or DEFAULT_PROFILE_DIR)
        return self._profiles.capture(duration_s, self.quiesced)

    def _describe(self, name: str, mesh) -> EngineInfo:
        c, cfg = self.runner.model.config, self.config
        axes = tuple(mesh.shape.items()) if mesh is not None else (("data", 1), ("model", 1))
        devices = mesh.devices.size if mesh is not None else 1
        processes = jax.process_count()
        return EngineInfo(
            name=name, architecture=c.architecture, vocab_size=c.vocab_size,
            max_position_embeddings=c.max_position_embeddings, dtype=c.dtype,
            num_slots=cfg.num_slots, num_pages=self.runner.num_pages, page_size=cfg.page_size,
            max_model_len=cfg.max_model_len, max_waiting=cfg.max_waiting,
            decode_steps=cfg.decode_steps, max_prefill_tokens=cfg.max_prefill_tokens,
            device=f"{jax.devices()[0].platform} x{devices}" + (
                f" over {processes} processes" if processes > 1 else ""), mesh=axes,
            jax_version=jax.__version__, warmup_seconds=self.warmup_seconds,
            step_timeout_s=self.step_timeout_s)

    # -- one step -----------------------------------------------------------------------------

    def step(self) -> bool:
        """One engine step: plan -> execute -> update. The device is kept fed: the step after
        the one in flight is planned and launched before that one's tokens are read (unless an
        abort or deadline is due), and when nothing is left in flight after the update, the next
        step is launched before this one's tokens become text. False when there was nothing to do."""
        events = self._plan_and_launch()
        busy = self._pipeline.in_flight > 0
        if busy:
            self._plan_and_launch()  # ahead of the step in flight
            events += self._pipeline.update_oldest()
            if not self._pipeline.in_flight:
                events += self._plan_and_launch()
        self._deliver(events + self._pipeline.take_failed())
        return busy or bool(events)

    def _plan_and_launch(self) -> list[RequestEvent]:
        """Plans the next step (ahead of the one in flight, if any) and launches it. Returns the
        final events of an empty plan's aborts and expiries (a plan with work reports them at
        its update)."""
        with self._lock, jax.profiler.TraceAnnotation("jaxgen.schedule"):
            if self._pipeline.in_flight:
                plan = self.scheduler.schedule_ahead()
            else:
                plan = self.scheduler.schedule()
                if plan.empty:
                    return self.scheduler.take_finished_events()
        if plan is not None:
            self._pipeline.launch(plan)
            if self._pipeline.lost is not None:
                self.dead = self._pipeline.lost
        return []

    # -- outputs ------------------------------------------------------------------------------

    def _deliver(self, events) -> None:
        if self._pipeline.lost is not None:
            self.dead = self._pipeline.lost
        for ev in events:
            text = self._text.get(ev.request_id)
            if text is None:
                continue
            try:
                out = self._output(text, ev)
            except Exception as e:  # isolate: this request fails, the others go on
                log.exception("request %s failed while delivering output", ev.request_id)
                detail = f"{type(e).__name__}: {e}"
                with self._lock:
                    final = self.scheduler.finish(ev.request_id, "error", detail)
                out = RequestOutput(ev.request_id, (), "", None, "error", detail,
                                    final.usage if final else None)
            if out.finished:
                del self._text[ev.request_id]
            self._open.deliver(out)

    def _output(self, text: RequestText, ev: RequestEvent) -> RequestOutput:
        emit, matched = text.push(ev.token_ids, ev.finish_reason)
        finish, detail, usage = ev.finish_reason, ev.detail, ev.usage
        if matched is not None and finish is None:
            finish, detail = "stop", f"stop string {matched!r}"
            with self._lock:
                final = self.scheduler.finish(ev.request_id, finish, detail)
            usage = final.usage if final is not None else None
        return RequestOutput(ev.request_id, tuple(ev.token_ids), emit, ev.logprobs, finish,
                             detail, usage)

    # -- the loop -----------------------------------------------------------------------------

    def has_work(self) -> bool:
        with self._lock:
            return self.scheduler.has_work()

    @property
    def running(self) -> bool:
        """Whether `start()`'s loop thread steps the engine."""
        return self._loop.running

    def start(self) -> None:
        """Runs `step()` on a background thread whenever there is work, watched by the step
        watchdog (with `step_timeout_s`)."""
        self._loop.start(self.step_timeout_s, self._hung)

    def stop(self) -> None:
        """Ends the loop after its step; bounded once the engine is dead (its loop may be stuck
        in a device call that never returns)."""
        self._loop.stop(None if self.dead is None else STOP_DEAD_TIMEOUT_S)
        self._pipeline.shutdown(wait=self.dead is None)
        if self.group is not None:  # the other processes stop with this one
            self.group.close()

    def quiesced(self, timeout_s: float = 60.0):
        """A context manager: the loop paused at a step boundary with nothing in flight (the
        device idle) for its body, e.g. to start or stop a profiler trace (`EngineLoop`)."""
        return self._loop.quiesced(timeout_s)

    def _drain(self) -> None:
        """Reads every launched step (their tokens are delivered as usual)."""
        while self._pipeline.in_flight:
            events = self._pipeline.update_oldest()
            self._deliver(events + self._pipeline.take_failed())

    def _hung(self, seconds: float) -> None:
        """The watchdog's call: a step has run past step_timeout_s. The engine is dead, and its
        requests end as retryable (nothing was wrong with them)."""
        detail = (f"a device step has run for {seconds:.0f}s, over step_timeout="
                  f"{self.step_timeout_s:g}s: the engine is hung")
        log.error("%s", detail)
        self.dead = EngineHungError(detail)
        self._open.fail_all(f"{ENGINE_UNAVAILABLE}: {detail}")

    def _lose(self, error: GroupLostError) -> None:
        """A process of the group was lost (on the group's thread; the loop may be stuck in a
        device call that will never return): dead at once, every open request ended retryable."""
        self.dead = error
        self._open.fail_all(f"{ENGINE_UNAVAILABLE}: {error}")

    def _crashed(self, error: BaseException) -> None:
        self.dead = error  # health reads it

    # -- offline ------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Runs every prompt to completion (continuous batching, this thread) and returns the
        completions in prompt order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        pending = list(zip(prompts, params_list))[::-1]
        streams, ours = [], set()
        # Ours still running: checked over the engine's open requests (at most slots + the
        # waiting bound), not over every stream of the call, at each step.
        while pending or any(request_id in ours for request_id in self._open.ids()):
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
