"""Host gap between device steps of the engine under Poisson arrivals (no gRPC in the way).

    python tools/bench_host_gap.py --config configs/serving/cpu-small.json --rate 20 \\
        --num-requests 96 [-- --slots 32 --max-model-len 512 ...]

Builds the engine exactly as `jaxgen serve --config PRESET [flags after --]` does (warm-up
included), starts its background loop, and feeds it `--num-requests` requests of
`bench_serving`'s seeded chat-like workload at `--rate` requests/s. The host gap of a step is the
time from the previous step's tokens reaching the host to this step's launch (0 when it was
launched ahead, before them): the time the device may sit idle waiting for the host. Prints
one line (steps, gap mean / p50 / p90 / p99 / max, share launched ahead, output tok/s) and
writes JSON with --out-json.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np

from bench_serving import add_preset_workload_args, preset_engine_and_workload
from jaxgen.engine_api import EngineObserver
from jaxgen.sampling_params import SamplingParams


class StepGaps(EngineObserver):
    def __init__(self):
        self.gaps: list[float] = []
        self.steps = 0

    def on_step(self, step_seconds: float, host_gap_seconds: float | None) -> None:
        self.steps += 1
        if host_gap_seconds is not None:  # None: after an idle wait, not a gap
            self.gaps.append(host_gap_seconds)


def summary(gaps_s: list[float]) -> dict:
    g = np.asarray(gaps_s) * 1e3
    if not len(g):
        return {}
    pct = lambda q: float(np.percentile(g, q))  # noqa: E731
    return dict(mean_ms=float(g.mean()), p50_ms=pct(50), p90_ms=pct(90), p99_ms=pct(99),
                max_ms=float(g.max()), launched_ahead_share=float((g == 0).mean()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=10.0, help="requests/s, Poisson")
    add_preset_workload_args(ap, num_requests=64, max_output_tokens=256)
    args = ap.parse_args(argv)
    if args.rate <= 0:
        ap.error(f"rate={args.rate}: must be > 0 (requests/s)")
    engine, items = preset_engine_and_workload(ap, args)
    rc = engine.config.runner
    observer = StepGaps()
    engine.observers.append(observer)
    engine.start()
    rng = np.random.default_rng(args.seed + 1)
    streams = []
    start = time.perf_counter()

    def feed():
        for prompt, out in items:
            streams.append(engine.add_request(prompt, SamplingParams(
                max_tokens=out, temperature=0.0, ignore_eos=True)))
            time.sleep(float(rng.exponential(1.0 / args.rate)))

    feeder = threading.Thread(target=feed)
    feeder.start()
    feeder.join()
    tokens = sum(len(s.result().token_ids) for s in streams)
    elapsed = time.perf_counter() - start
    engine.stop()
    report = dict(config=args.config, serve_flags=args.serve_flags, rate=args.rate,
                  num_requests=args.num_requests, slots=rc.num_slots,
                  decode_steps=rc.decode_steps, steps=observer.steps,
                  output_tok_s=tokens / elapsed, **summary(observer.gaps))
    print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in report.items()))
    if args.out_json:
        with open(args.out_json, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
