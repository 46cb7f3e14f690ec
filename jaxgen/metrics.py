"""Prometheus metrics of a serving engine, and the HTTP endpoint (`/metrics`) that exposes them.

`ServingMetrics(engine)` registers itself as an engine observer: per finished request it counts
outcomes and tokens and observes the latency histograms (from the request's `Usage` and its
end-to-end time); per step it observes the step time and the host gap between device steps;
per engine failure its cause, and per restart the time to serving again. Occupancy and counters
(running, waiting, slots, pages, prefix cache, preemptions, shed requests, restarts,
compilations after warm-up) are read at scrape time from the engine surface's `stats()`
snapshot and `info()`. Each instance has its own
registry: no module-level state. The engine never imports this module.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jaxgen.engine_api import EngineObserver, EngineSurface, FinishedRequest

LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 25, 60, 120)
TOKEN_LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5)
STEP_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, .01, .025, .05, .1,
                .25, .5, 1, 2.5)


class ServingMetrics(EngineObserver):
    def __init__(self, engine: EngineSurface, registry: CollectorRegistry | None = None):
        self.engine = engine
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("jaxgen_requests", "Finished requests by outcome and finish reason",
                                ("outcome", "finish_reason"), registry=r)
        self.prompt_tokens = Counter("jaxgen_prompt_tokens", "Prompt tokens of finished requests",
                                     registry=r)
        self.cached_prompt_tokens = Counter(
            "jaxgen_cached_prompt_tokens", "Prompt tokens served by the prefix cache", registry=r)
        self.generation_tokens = Counter("jaxgen_generation_tokens",
                                         "Tokens generated for finished requests", registry=r)
        self.ttft = Histogram("jaxgen_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("jaxgen_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request",
                              buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("jaxgen_e2e_request_latency_seconds", "Arrival to final output",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("jaxgen_queue_time_seconds", "Arrival to first scheduled",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.prefill = Histogram("jaxgen_prefill_time_seconds",
                                 "First scheduled to first token (prompt prefill)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.step = Histogram("jaxgen_engine_step_seconds",
                              "One engine step on the runner: dispatch to tokens on host",
                              buckets=STEP_BUCKETS, registry=r)
        self.host_gap = Histogram("jaxgen_host_gap_seconds",
                                  "Host time between one device step's return and the next's start",
                                  buckets=STEP_BUCKETS, registry=r)
        self.launched_ahead = Counter(
            "jaxgen_steps_launched_ahead_total",
            "Steps launched while earlier ones were still in flight", registry=r)
        self.launched_on_drained = Counter(
            "jaxgen_steps_launched_on_drained_device_total",
            "Steps launched ahead whose dispatch returned after the device had finished every "
            "earlier step (it idled meanwhile: the host set the pace)", registry=r)
        self.launch = Histogram("jaxgen_step_launch_seconds",
                                "Host time to dispatch a step launched ahead (uploads, jit calls)",
                                buckets=STEP_BUCKETS, registry=r)
        self.draft_tokens = Counter("jaxgen_draft_tokens",
                                    "Speculative decoding: drafted tokens verified", registry=r)
        self.accepted_draft_tokens = Counter(
            "jaxgen_accepted_draft_tokens", "Speculative decoding: drafted tokens accepted",
            registry=r)
        self.acceptance = Histogram(
            "jaxgen_draft_acceptance_rate", "Share of a request's drafts accepted, per verify step",
            buckets=(0, .1, .2, .3, .4, .5, .6, .7, .8, .9, 1), registry=r)
        self.accepted_length = Histogram(
            "jaxgen_draft_accepted_length", "Drafted tokens accepted per request and verify step",
            buckets=(0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16), registry=r)
        self.engine_failures = Counter(
            "jaxgen_engine_failures", "Engine failures by cause (killed, exited, hung, failed, group_lost)",
            ("cause",), registry=r)
        self.engine_restart = Histogram(
            "jaxgen_engine_restart_seconds", "Engine failure to serving again, per restart",
            buckets=(1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600), registry=r)
        r.register(_OccupancyCollector(engine))
        engine.observers.append(self)

    def on_step(self, step_seconds: float, host_gap_seconds: float | None) -> None:
        self.step.observe(step_seconds)
        if host_gap_seconds is not None:
            self.host_gap.observe(host_gap_seconds)

    def on_launch(self, device_drained: bool, launch_seconds: float) -> None:
        self.launched_ahead.inc()
        self.launch.observe(launch_seconds)
        if device_drained:
            self.launched_on_drained.inc()

    def on_drafts(self, drafts: int, accepted: int) -> None:
        self.draft_tokens.inc(drafts)
        self.accepted_draft_tokens.inc(accepted)
        self.acceptance.observe(accepted / drafts)
        self.accepted_length.observe(accepted)

    def on_engine_failure(self, cause: str, detail: str, restarting: bool) -> None:
        self.engine_failures.labels(cause).inc()

    def on_engine_restart(self, seconds: float) -> None:
        self.engine_restart.observe(seconds)

    def on_finish(self, finished: FinishedRequest) -> None:
        out, usage = finished.output, finished.output.usage
        self.requests.labels(out.outcome, out.finish_reason).inc()
        self.e2e.observe(finished.e2e_seconds)
        if usage is None:
            return
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.cached_prompt_tokens.inc(usage.cached_prompt_tokens)
        self.generation_tokens.inc(usage.completion_tokens)
        if usage.queue_time is not None:
            self.queue.observe(usage.queue_time)
        if usage.time_to_first_token is not None:
            self.ttft.observe(usage.time_to_first_token)
            if usage.queue_time is not None:
                self.prefill.observe(usage.time_to_first_token - usage.queue_time)
            if usage.completion_tokens > 1:
                self.tpot.observe((finished.e2e_seconds - usage.time_to_first_token)
                                  / (usage.completion_tokens - 1))

    def serve(self, host: str, port: int) -> int:
        """Serves `/metrics` over HTTP on a daemon thread; returns the bound port (port 0: any)."""
        try:
            server, _ = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            raise ValueError(f"metrics_port={port}: cannot listen on {host}:{port}: "
                             f"{e.strerror or e}") from None
        return server.server_port


class _OccupancyCollector:
    """Reads the engine's counters at scrape time (one `stats()` snapshot per scrape)."""

    def __init__(self, engine: EngineSurface):
        self.engine = engine

    def collect(self):
        s, info = self.engine.stats(), self.engine.info()
        total = info.num_pages

        def gauge(name, doc, value):
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name, doc, value):
            return CounterMetricFamily(name, doc, value=value)

        yield gauge("jaxgen_requests_running", "Requests holding a decode slot", s.num_running)
        yield gauge("jaxgen_requests_waiting", "Requests in the waiting queue", s.num_waiting)
        yield gauge("jaxgen_slots_used", "Decode slots in use", info.num_slots - s.num_free_slots)
        yield gauge("jaxgen_slots", "Decode slots in all", info.num_slots)
        yield gauge("jaxgen_kv_pages_used", "KV pages held by running requests", s.num_pages_used)
        yield gauge("jaxgen_kv_pages_free", "KV pages allocatable now (free + evictable cached)",
                    s.num_pages_free)
        yield gauge("jaxgen_kv_pages", "KV pages in the pool", total)
        yield gauge("jaxgen_kv_pages_used_ratio", "Share of the KV pool held by running requests",
                    s.num_pages_used / total if total else 0.0)
        yield counter("jaxgen_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache",
                      s.prefix_cache_query_tokens)
        yield counter("jaxgen_prefix_cache_hit_tokens", "Looked-up tokens found in the prefix cache",
                      s.prefix_cache_hit_tokens)
        yield counter("jaxgen_preemptions", "Requests preempted (recomputed later) for KV pages",
                      s.num_preemptions)
        yield counter("jaxgen_compilations_after_warmup",
                      "XLA compilations while serving (should stay 0)",
                      s.compilations_after_warmup)
        yield counter("jaxgen_requests_displaced",
                      "Waiting requests shed from a full queue by a more urgent arrival",
                      s.num_displaced)
        yield counter("jaxgen_requests_queue_timeouts",
                      "Requests shed after waiting longer than --max-queue-time",
                      s.num_queue_timeouts)
        yield counter("jaxgen_engine_restarts", "Engine processes restarted after a failure",
                      s.num_engine_restarts)
        engine = self.engine
        yield gauge("jaxgen_engine_up", "1 while the engine can serve (0 while it restarts)",
                    int(engine.dead is None and engine.restarting is None))
