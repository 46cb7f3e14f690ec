"""How much of a model each process of a group holds: the weight bytes on this process's devices
(the shards of its own devices, `addressable_shards`) and its peak RSS after loading, for one
process alone and for every process of a group (docs/benchmarks.md, "Multi-host: weights per
process").

    python tools/bench_group_memory.py --model smollm2-135m --mesh 1,2         # one process
    python tools/launch_group.py -n 2 --cpu-devices 2 -- \\
        python tools/bench_group_memory.py --model smollm2-135m --mesh 1,4     # two processes

Each process loads through `jaxgen.build.load_model` as `jaxgen serve` does (each device receives
only its shards: `jax.make_array_from_callback` for GGUF and safetensors, Orbax restoring into the
target shardings). Process 0 prints one table row per process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxgen.config import Config, DistributedConfig, ModelSource  # noqa: E402


def held_bytes(params) -> tuple[int, int]:
    """(bytes on this process's devices, bytes of the whole model)."""
    import jax

    mine = whole = 0
    for leaf in jax.tree.leaves(params):
        whole += leaf.size * leaf.dtype.itemsize
        mine += sum(s.data.size * s.data.dtype.itemsize for s in leaf.addressable_shards)
    return mine, whole


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--mesh", required=True, metavar="DATA,MODEL")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args()
    from jaxgen.build import load_model
    from jaxgen.config_sources import parse_mesh

    env = os.environ
    count = int(env.get("JAXGEN_NUM_PROCESSES", "1"))
    dist = DistributedConfig(coordinator_address=env.get("JAXGEN_COORDINATOR_ADDRESS"),
                             num_processes=count, process_id=int(env.get("JAXGEN_PROCESS_ID", "0")),
                             peer_timeout_s=60)
    config = Config(model=ModelSource(args.model, cache_dir=args.cache_dir),
                    mesh=parse_mesh(args.mesh), distributed=dist)
    group = None
    if count > 1:
        from jaxgen.distributed import join

        group = join(config)
    import jax

    loaded, mesh = load_model(config, group)
    mine, whole = held_bytes(loaded.params)
    row = dict(process=jax.process_index(), processes=jax.process_count(),
               local_devices=jax.local_device_count(), mesh=args.mesh, weights_mib=mine / 2**20,
               model_mib=whole / 2**20, peak_rss_mib=resource.getrusage(
                   resource.RUSAGE_SELF).ru_maxrss / 1024)
    if group is None:
        rows = [row]
    else:
        group.publish(f"memory/{group.process_id}", json.dumps(row))
        if not group.is_leader:
            group.read("memory/done")
            return 0
        rows = [json.loads(group.read(f"memory/{r}", f"process {r}")) for r in range(count)]
        group.publish("memory/done", "1")
    print(f"\n{args.model} ({rows[0]['model_mib']:.0f} MiB of weights), mesh {args.mesh}, "
          f"{jax.default_backend()}, jax {jax.__version__}")
    print("| process | of | local devices | weights on its devices MiB | share of the model | "
          "peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['process']} | {r['processes']} | {r['local_devices']} | "
              f"{r['weights_mib']:.0f} | {r['weights_mib'] / r['model_mib']:.0%} | "
              f"{r['peak_rss_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
