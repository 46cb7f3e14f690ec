"""Where a decode step's time goes on GPU: kernels per token and busy vs idle stream time.

    python3 tools/profile_decode.py 1      # Llama-3.2-1B shape, random weights, batch 1
    python3 tools/profile_decode.py 128

Runs the full engine (16-token decode columns) under `jax.profiler.trace` (perfetto trace in
$OUT or /tmp), then reads the trace: kernels on the busiest GPU stream, their union (busy time)
against the span of the run, and the kernels that take the most time.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

NEW_TOKENS = 65


def busy_time(intervals) -> float:
    """Length of the union of `(start, end)` intervals."""
    busy, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return busy if cur_end is None else busy + cur_end - cur_start


def stream_summary(events):
    """Perfetto trace events -> (kernels, span µs, busy µs, {name: (total µs, count)}) of the
    GPU stream with the most kernel events."""
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = [e for e in events if e.get("ph") == "X" and "GPU" in names.get(e.get("pid"), "")
           and e.get("dur", 0) > 0]
    busiest, _ = collections.Counter((e["pid"], e["tid"]) for e in gpu).most_common(1)[0]
    kernels = [e for e in gpu if (e["pid"], e["tid"]) == busiest]
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in kernels]
    span = max(end for _, end in spans) - min(start for start, _ in spans)
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for e in kernels:
        by_name[e["name"][:60]][0] += e["dur"]
        by_name[e["name"][:60]][1] += 1
    return len(kernels), span, busy_time(spans), dict(by_name)


def trace_decode(batch: int, out: str) -> tuple[str, float]:
    """Runs B requests of 128 tokens + NEW_TOKENS greedy under the profiler; (trace, wall s)."""
    import jax

    from bench_offline import RandomTokenTokenizer, random_params
    from jaxgen.config import EngineConfig
    from jaxgen.engine import Engine
    from jaxgen.models import Model, ModelConfig
    from jaxgen.sampling_params import SamplingParams

    model = Model(ModelConfig.from_json_file("configs/models/llama-3.2-1b.json"))
    engine = Engine(model, random_params(model), RandomTokenTokenizer(), EngineConfig(
        num_slots=batch, max_model_len=512, decode_steps=16, max_prefill_tokens=128 * batch,
        memory_utilization=0.5))
    prompts = [[(7 * i + j) % 1000 + 1 for j in range(128)] for i in range(batch)]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    engine.generate(prompts, params)  # compile outside the trace
    with jax.profiler.trace(out, create_perfetto_trace=True):
        start = time.perf_counter()
        engine.generate(prompts, params)
        wall = time.perf_counter() - start
    return glob.glob(out + "/**/*perfetto_trace.json.gz", recursive=True)[0], wall


def main() -> None:
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    path, wall = trace_decode(batch, os.environ.get("OUT", "/tmp") + f"/trace_b{batch}")
    trace = json.load(gzip.open(path))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    n, span, busy, by_name = stream_summary(events)
    print(f"B={batch}: wall {wall * 1e3:.1f} ms for {NEW_TOKENS} tokens; kernels on the busiest "
          f"GPU stream: {n} ({n / NEW_TOKENS:.0f} per token), span {span / 1e3:.1f} ms, busy "
          f"{busy / 1e3:.1f} ms ({busy / span:.0%})")
    for name, (total, count) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:14]:
        print(f"  {total / 1e3:8.2f} ms  {count:5d}x  avg {total / count:7.1f} us  {name}")


if __name__ == "__main__":
    main()
