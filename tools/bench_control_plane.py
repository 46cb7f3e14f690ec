"""How process 0's `StepPlan`s should reach the other processes of a group: the cost per step of
three mechanisms JAX offers, against the step they feed (docs/benchmarks.md, "Multi-host
control plane").

Run every process of a group with the same command (tools/launch_group.py does):

    python tools/launch_group.py -n 2 --cpu-devices 2 -- \\
        python tools/bench_control_plane.py --model smollm2-135m --mesh 1,4

Without a group (no JAXGEN_NUM_PROCESSES) it measures one process's decode step only, the
baseline the shares are also read against:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        python tools/bench_control_plane.py --model smollm2-135m --mesh 1,4

Each process joins the group (`jaxgen.distributed.join`), then for each mechanism process 0
sends the same plans (a decode step of every slot, and a prefill of --prefill-tokens) `--steps`
times, one at a time, and every process notes when it holds the decoded plan (one clock: the
processes share this machine):
  * socket: jaxgen's control channel (`jaxgen.distributed.wire`: pickled plan, one TCP
    connection per process, opened to the address process 0 publishes);
  * kv: the `jax.distributed` coordination service's key-value store (process 0 sets a key per
    plan, the others block on it with a timeout);
  * collective: `multihost_utils.broadcast_one_to_all` of the plan encoded in a fixed-size
    array (a jitted all-reduce on the devices: gloo on CPU).
Reported per mechanism: process 0's own time per plan (its thread is busy that long), and the
time until the last process holds the plan (a step cannot finish before then), median and p99,
in µs and as a share of the engine's decode step measured after it (process 0's engine over
the group, `generate` of --slots prompts). One table on process 0's stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from jaxgen.config import Config, DistributedConfig, EngineConfig, ModelSource  # noqa: E402
from jaxgen.scheduler.plan import PrefillChunk, StepPlan  # noqa: E402
from jaxgen.distributed import wire  # noqa: E402

FIXED_BYTES = 16384  # the collective's array: a plan must fit


def plans(slots: int, prefill_tokens: int, decode_steps: int) -> list[StepPlan]:
    decode = StepPlan(step=7, decode_slots=tuple(range(slots)),
                      decode_positions=tuple(100 + s for s in range(slots)),
                      decode_serials=tuple(range(slots)), num_steps=decode_steps)
    prefill = StepPlan(step=8, prefills=(PrefillChunk("request-0", 0, 0, tuple(range(prefill_tokens)),
                                                      True, 1),),
                       decode_slots=tuple(range(1, slots)), decode_positions=tuple(range(1, slots)),
                       decode_serials=tuple(range(1, slots)), num_steps=decode_steps,
                       page_table_updates={0: tuple(range(1, 1 + prefill_tokens // 16))})
    return [decode, prefill]


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


def bench_socket(group, plan, steps, tag):
    """One TCP connection per process, the wire format of jaxgen's control channel."""
    sent, held, busy = [], [], []
    if group.is_leader:
        server = socket.create_server(("", 0))
        group.publish(f"bench/socket/{tag}", str(server.getsockname()[1]))
        conns = [wire.Connection(server.accept()[0]) for _ in range(group.num_processes - 1)]
        for conn in conns:
            conn.recv()  # ready
        for seq in range(1, steps + 1):
            start = time.perf_counter()
            payload = wire.plan_payload(seq, plan)
            for conn in conns:
                conn.send(wire.PLAN, payload)
            busy.append(time.perf_counter() - start)
            sent.append(start)
            for conn in conns:  # one plan at a time: the next goes once all hold this one
                conn.recv()
        server.close()
    else:
        host = group.coordinator_address.rpartition(":")[0]
        conn = wire.Connection(socket.create_connection(
            (host, int(group.read(f"bench/socket/{tag}"))), 60))
        conn.send(wire.BEAT)
        for _ in range(steps):
            kind, payload = conn.recv()
            wire.read_plan(payload)
            held.append(time.perf_counter())
            conn.send(wire.BEAT)
    return sent, held, busy


def bench_kv(group, plan, steps, tag):
    """A key per plan in the coordination service; the others block on it."""
    client = group.client
    sent, held, busy = [], [], []
    for seq in range(1, steps + 1):
        key = f"jaxgen/bench/kv/{tag}/{seq}"
        if group.is_leader:
            start = time.perf_counter()
            client.key_value_set_bytes(key, wire.plan_payload(seq, plan))
            busy.append(time.perf_counter() - start)
            sent.append(start)
        else:
            wire.read_plan(client.blocking_key_value_get_bytes(key, 60_000))
            held.append(time.perf_counter())
        client.wait_at_barrier(f"jaxgen-bench-kv-{tag}-{seq}", 60_000)  # one plan at a time
        if group.is_leader and seq > 1:
            client.key_value_delete(f"jaxgen/bench/kv/{tag}/{seq - 1}")
    return sent, held, busy


def bench_collective(group, plan, steps, tag):
    """The plan in a fixed-size uint8 array, broadcast from process 0 by a jitted collective."""
    from jax.experimental import multihost_utils

    sent, held, busy = [], [], []
    encoded = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
    assert len(encoded) + 4 <= FIXED_BYTES, len(encoded)
    for seq in range(steps + 1):  # the first call compiles: not counted
        start = time.perf_counter()
        buffer = np.zeros(FIXED_BYTES, np.uint8)
        if group.is_leader:
            blob = len(encoded).to_bytes(4, "little") + pickle.dumps(plan, protocol=5)
            buffer[:len(blob)] = np.frombuffer(blob, np.uint8)  # encoding counted, as elsewhere
        out = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
        size = int.from_bytes(out[:4].tobytes(), "little")
        pickle.loads(out[4:4 + size].tobytes())
        done = time.perf_counter()
        multihost_utils.sync_global_devices(f"jaxgen-bench-collective-{tag}-{seq}")
        if seq == 0:
            continue
        if group.is_leader:
            sent.append(start)
            busy.append(done - start)
        held.append(done)
    return sent, held, busy


def decode_step_seconds(config, group, prompts: int, max_tokens: int) -> float | None:
    """The median decode step of process 0's engine over the group (None on the others), or of
    one process's engine (`group` None)."""
    from jaxgen.build import build_engine, run_worker
    from jaxgen.distributed import Leader
    from jaxgen.engine_api import EngineObserver
    from jaxgen.sampling_params import SamplingParams

    if group is not None and not group.is_leader:
        run_worker(config, group)
        return None
    leader = None
    if group is not None:
        leader = Leader(group)
        leader.start()
    engine = build_engine(config, leader=leader)

    class Steps(EngineObserver):
        seconds: list = []

        def on_step(self, step_seconds, host_gap_seconds):
            self.seconds.append(step_seconds)

    steps = Steps()
    engine.observers.append(steps)
    ids = [engine.tokenizer.encode(f"Item {i}: a short note about") for i in range(prompts)]
    engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    engine.stop()
    return statistics.median(steps.seconds[len(steps.seconds) // 4:])  # past the first prefills


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--mesh", required=True, metavar="DATA,MODEL")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--decode-steps", type=int, default=4)
    p.add_argument("--prefill-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--json", default=None, help="also write the table's rows here (process 0)")
    args = p.parse_args()
    from jaxgen.config_sources import parse_mesh
    from jaxgen.distributed import join

    env = os.environ
    engine = EngineConfig(num_slots=args.slots, decode_steps=args.decode_steps, max_model_len=256,
                          num_pages=256, max_prefill_tokens=args.prefill_tokens)
    if "JAXGEN_NUM_PROCESSES" not in env:  # one process: the step the plans would feed
        import jax

        config = Config(model=ModelSource(args.model), mesh=parse_mesh(args.mesh), engine=engine)
        step = decode_step_seconds(config, None, args.slots, args.max_tokens)
        print(f"\none process ({jax.local_device_count()} {jax.default_backend()} devices), mesh "
              f"{args.mesh}, {args.model}, slots {args.slots}: decode step (median) "
              f"{step * 1e3:.2f} ms; jax {jax.__version__}")
        return 0
    config = Config(
        model=ModelSource(args.model), mesh=parse_mesh(args.mesh), engine=engine,
        distributed=DistributedConfig(coordinator_address=env["JAXGEN_COORDINATOR_ADDRESS"],
                                      num_processes=int(env["JAXGEN_NUM_PROCESSES"]),
                                      process_id=int(env["JAXGEN_PROCESS_ID"]), peer_timeout_s=60))
    group = join(config)
    rows = []
    for name, plan in zip(("decode", "prefill"), plans(args.slots, args.prefill_tokens,
                                                        args.decode_steps)):
        size = len(wire.plan_payload(0, plan))
        for mechanism, bench in (("socket", bench_socket), ("kv", bench_kv),
                                 ("collective", bench_collective)):
            sent, held, busy = bench(group, plan, args.steps, name)
            group.publish(f"bench/{mechanism}/{name}/{group.process_id}", json.dumps(held))
            if group.is_leader:
                others = [json.loads(group.read(f"bench/{mechanism}/{name}/{r}"))
                          for r in range(1, group.num_processes)]
                last = [max(times[i] for times in others) - sent[i] for i in range(len(sent))]
                rows.append(dict(mechanism=mechanism, plan=name, plan_bytes=size,
                                 busy_us=statistics.median(busy) * 1e6,
                                 held_us=statistics.median(last) * 1e6,
                                 held_p99_us=percentile(last, 99) * 1e6))
    step = decode_step_seconds(config, group, args.slots, args.max_tokens)
    if not group.is_leader:
        return 0
    import jax

    print(f"\ncontrol plane over {group.num_processes} processes ({jax.local_device_count()} "
          f"{jax.default_backend()} devices each), mesh {args.mesh}, {args.model}, slots "
          f"{args.slots}; decode step (median) {step * 1e3:.2f} ms; jax {jax.__version__}")
    print("| mechanism | plan | bytes | process 0 busy µs | all hold it µs (p50) | p99 | "
          "share of a decode step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        r["step_ms"] = step * 1e3
        r["share"] = r["held_us"] / (step * 1e6)
        print(f"| {r['mechanism']} | {r['plan']} | {r['plan_bytes']} | {r['busy_us']:.0f} | "
              f"{r['held_us']:.0f} | {r['held_p99_us']:.0f} | {r['share']:.1%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
