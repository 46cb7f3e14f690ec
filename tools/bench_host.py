"""Where the offline engine's host time goes, per step: planning, dispatch, waiting for the
device, folding tokens in, and detokenizing / streaming, on `bench_serving`'s workload.

    python tools/bench_host.py --config configs/serving/gemma3-270m-bench-gpu.json \\
        --num-requests 512 --max-prompt-tokens 1024 --max-output-tokens 512 [-- --overlap-launch]

Builds the engine from a serving preset exactly as `jaxgen serve --config PRESET [flags after
--]` does (warm-up included), runs the requests through `Engine.generate` (greedy,
ignore_eos), and times each stage where the engine calls it (this instance's methods wrapped,
nothing else changed). Prints one table: stage, calls, ms per step, µs per output token, share
of the run. "wait for tokens" is `ModelRunner.collect`: the device still running (or, with
launches ahead, nothing); the rest is host work on the engine thread. With --overlap-launch
the dispatch runs on the launcher thread and overlaps the other stages.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import time

from bench_serving import add_preset_workload_args, preset_engine_and_workload
from jaxgen.sampling_params import SamplingParams

# (what to wrap, attribute, row name): the engine's own calls into its parts.
STAGES = (("scheduler", "schedule", "plan (first step)"),
          ("scheduler", "schedule_ahead", "plan ahead"),
          ("runner", "launch", "dispatch (uploads, jit calls)"),
          ("runner", "collect", "wait for tokens (device)"),
          ("scheduler", "update", "fold tokens in (scheduler)"),
          ("engine", "_deliver", "text and streams (detokenize, stops)"))


def timed(fn, key, totals, calls):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - start
            calls[key] += 1
    return wrapper


def measure(engine, items) -> dict:
    """Runs `items` through `engine` with its stages timed; returns the report."""
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in items]
    prompts = [p for p, _ in items]
    engine.generate(prompts[:2], params[:2])  # first use of the shapes, outside the timing
    totals, calls = collections.defaultdict(float), collections.Counter()
    owners = {"engine": engine, "runner": engine.runner, "scheduler": engine.scheduler}
    for owner, name, key in STAGES:
        target = owners[owner]
        setattr(target, name, timed(getattr(target, name), key, totals, calls))
    engine.step = timed(engine.step, "step", totals, calls)
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in out)
    steps = calls["step"]
    rows = [dict(stage=key, calls=calls[key], ms_per_step=totals[key] / steps * 1e3,
                 us_per_token=totals[key] / tokens * 1e6, share=totals[key] / elapsed)
            for _, _, key in STAGES]
    return dict(requests=len(items), output_tokens=tokens, steps=steps, seconds=elapsed,
                output_tok_s=tokens / elapsed, stages=rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_preset_workload_args(p, num_requests=256, max_output_tokens=512)
    args = p.parse_args(argv)
    engine, items = preset_engine_and_workload(p, args)
    report = measure(engine, items)
    print(f"{report['requests']} requests, {report['output_tokens']} output tokens, "
          f"{report['steps']} steps, {report['seconds']:.2f} s, {report['output_tok_s']:.0f} tok/s "
          f"({args.config} {' '.join(args.serve_flags)})")
    print("| stage | calls | ms / step | µs / output token | share of run |")
    print("|---|---|---|---|---|")
    for r in report["stages"]:
        print(f"| {r['stage']} | {r['calls']} | {r['ms_per_step']:.2f} | {r['us_per_token']:.2f} "
              f"| {r['share']:.0%} |")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
