"""Where a decode step's time goes on GPU: kernels per token and busy vs idle stream time.

    python3 tools/profile_decode.py 1      # Llama-3.2-1B shape, random weights, batch 1
    python3 tools/profile_decode.py 128

Runs the full engine (16-token decode columns) under `jax.profiler.trace` (perfetto trace in
$OUT or /tmp), then reads the trace: kernels on the busiest GPU stream, their union (busy time)
against the span of the run, and the kernels that take the most time.
"""
import collections, glob, gzip, json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax
from bench_offline import random_params, RandomTokenTokenizer
from jaxgen.engine import Engine, EngineConfig
from jaxgen.models import Model, ModelConfig
from jaxgen.runtime.runner import RunnerConfig
from jaxgen.sampling_params import SamplingParams

batch = int(sys.argv[1]) if len(sys.argv) > 1 else 1
cfg = ModelConfig.from_json_file("configs/models/llama-3.2-1b.json")
model = Model(cfg)
params = random_params(model)
eng = Engine(model, params, RandomTokenTokenizer(), EngineConfig(runner=RunnerConfig(
    num_slots=batch, max_model_len=512, decode_steps=16, max_prefill_tokens=128 * batch, memory_fraction=0.5)))
prompts = [[(7 * i + j) % 1000 + 1 for j in range(128)] for i in range(batch)]
sp = SamplingParams(max_tokens=65, temperature=0.0, ignore_eos=True)
eng.generate(prompts, sp)
out = os.environ.get("OUT", "/tmp") + f"/trace_b{batch}"
with jax.profiler.trace(out, create_perfetto_trace=True):
    t = time.perf_counter(); eng.generate(prompts, sp); wall = time.perf_counter() - t
print(f"B={batch} wall {wall*1e3:.1f} ms for 65 tokens")
path = glob.glob(out + "/**/*perfetto_trace.json.gz", recursive=True)[0]
tr = json.load(gzip.open(path))
ev = tr["traceEvents"] if isinstance(tr, dict) else tr
pname = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
gpu = [e for e in ev if e.get("ph") == "X" and "GPU" in pname.get(e.get("pid"), "") and e.get("dur", 0) > 0]
tids = collections.Counter((e["pid"], e["tid"]) for e in gpu)
print("gpu tracks:", [(pname[p], t, n) for (p, t), n in tids.most_common(6)])
(p0, t0), _ = tids.most_common(1)[0]
ks = sorted((e for e in gpu if (e["pid"], e["tid"]) == (p0, t0)), key=lambda e: e["ts"])
start, end = ks[0]["ts"], max(e["ts"] + e["dur"] for e in ks)
busy, cur_s, cur_e = 0.0, None, None
for e in ks:
    s, f = e["ts"], e["ts"] + e["dur"]
    if cur_e is None or s > cur_e:
        if cur_e is not None: busy += cur_e - cur_s
        cur_s, cur_e = s, f
    else:
        cur_e = max(cur_e, f)
busy += cur_e - cur_s
print(f"kernels on main stream: {len(ks)}  ({len(ks)/65:.0f} per token)  span {(end-start)/1e3:.1f} ms  busy {busy/1e3:.1f} ms ({busy/(end-start):.0%})")
tot = collections.Counter(); cnt = collections.Counter()
for e in ks:
    tot[e["name"][:60]] += e["dur"]; cnt[e["name"][:60]] += 1
for n, d in tot.most_common(14):
    print(f"  {d/1e3:8.2f} ms  {cnt[n]:5d}x  avg {d/cnt[n]:7.1f} us  {n}")
