"""`jaxgen batch` against the offline engine on the same prompts, in one process and on one
engine: output tok/s of `Engine.generate` (the ceiling) and of `jaxgen.batch.run` (JSONL in,
records out), alternating for --reps rounds (the best of each kept), and their ratio. With `--memory N,M`: the peak RSS of a
batch job of N and of M lines (each in a fresh process) through a tiny model.

    python tools/bench_batch.py --model smollm2-135m --lines 64 --max-tokens 64 -- --slots 8
    python tools/bench_batch.py --memory 200,20000 --model CKPT -- --slots 8 --max-model-len 128

Flags after -- are `jaxgen batch` settings (model and engine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["Write a short note about {}.", "List three facts about {}:", "Explain {} to a child.",
           "The history of {} begins"]
TOPICS = ["rivers", "bread", "the moon", "railways", "glass", "bees", "maps", "clocks"]


def specs(n: int, max_tokens: int) -> list[dict]:
    out = []
    for i in range(n):
        text = PROMPTS[i % len(PROMPTS)].format(TOPICS[i % len(TOPICS)]) + f" ({i})"
        out.append({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                    "body": {"prompt": text, "max_tokens": max_tokens, "temperature": 0,
                             "ignore_eos": True}})
    return out


def speed(args, config) -> dict:
    from jaxgen import batch
    from jaxgen.build import build_engine
    from jaxgen.sampling_params import SamplingParams

    engine = build_engine(config)
    lines = specs(args.lines, args.max_tokens)
    prompts = [engine.tokenizer.encode(s["body"]["prompt"]) for s in lines]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    engine.generate(prompts[:2], params)  # shapes first used outside the timing
    best_offline = best_batch = float("inf")
    with tempfile.TemporaryDirectory() as work:
        inp = os.path.join(work, "in.jsonl")
        with open(inp, "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in lines)
        for rep in range(args.reps):
            start = time.perf_counter()
            offline = sum(len(c.token_ids) for c in engine.generate(prompts, params))
            best_offline = min(best_offline, time.perf_counter() - start)
            start = time.perf_counter()
            s = batch.run(inp, os.path.join(work, f"out{rep}.jsonl"),
                          options=batch.BatchOptions(quiet=True), engine=engine)
            best_batch = min(best_batch, time.perf_counter() - start)
    return dict(lines=args.lines, max_tokens=args.max_tokens, reps=args.reps,
                offline_tok_s=offline / best_offline, batch_tok_s=s.output_tokens / best_batch,
                ratio=(s.output_tokens / best_batch) / (offline / best_offline), ok=s.ok,
                slots=engine.info().num_slots, device=engine.info().device)


MEMORY = """
import json, resource, sys
from jaxgen.batch import BatchOptions, run
from jaxgen.cli import parser
from jaxgen.config_sources import config_from_args
n, work = int(sys.argv[1]), sys.argv[2]
with open(work + "/in.jsonl", "w") as f:
    for i in range(n):
        f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                            "body": {"prompt": f"Line {i} of a long file.", "max_tokens": 1}}) + "\\n")
config = config_from_args(parser().parse_args(["batch", "-", "-", *sys.argv[3:]]), "batch")
s = run(work + "/in.jsonl", work + "/out.jsonl", config, BatchOptions(quiet=True))
print(json.dumps({"lines": n, "ok": s.ok, "peak_rss_mib": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": s.wall_s}))
"""


def memory(sizes, flags) -> list[dict]:
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as work:
            run = subprocess.run([sys.executable, "-c", MEMORY, str(n), work, *flags],
                                 capture_output=True, text=True, cwd=ROOT)
            if run.returncode:
                raise SystemExit(run.stderr[-3000:])
            rows.append(json.loads(run.stdout.splitlines()[-1]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lines", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--memory", default=None, metavar="N,M", help="peak RSS of batch jobs of N and M lines")
    p.add_argument("flags", nargs="*", help="after --: jaxgen batch settings")
    args = p.parse_args(argv)
    flags = ["--model", args.model, *args.flags]
    if args.memory:
        rows = memory([int(v) for v in args.memory.split(",")], flags)
        for r in rows:
            print(f"{r['lines']:>7} lines: peak RSS {r['peak_rss_mib']:.1f} MiB ({r['seconds']:.1f} s)")
        print(json.dumps(rows))
        return 0
    from jaxgen.cli import parser
    from jaxgen.config_sources import config_from_args

    config = config_from_args(parser().parse_args(["batch", "-", "-", *flags]), "batch")
    r = speed(args, config)
    print(f"{r['lines']} lines x {r['max_tokens']} tokens, {r['slots']} slots, {r['device']}: "
          f"offline {r['offline_tok_s']:.1f} tok/s, batch {r['batch_tok_s']:.1f} tok/s "
          f"= {r['ratio']:.1%} of offline")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
