"""Where an engine's warm-up goes: the runner's warm-up under cProfile, with the persistent
compilation cache as `jaxgen serve` uses it (run twice: the second run's cache is warm).

    python tools/profile_warmup.py [--top 25] [serve flags, e.g. --model smollm2-135m --slots 8]

Prints the warm-up's wall time and the functions by cumulative time: with a warm cache, JAX's
tracing (`trace_to_jaxpr`) and lowering (`lower_sharding_computation`) against the cache loads.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pstats
import sys
import time

from jaxgen.build import build_engine
from jaxgen.config_sources import add_settings, config_from_args


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--top", type=int, default=25)
    add_settings(p, "serve")
    args = p.parse_args()
    config = config_from_args(args, "serve")
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, warmup=False))
    runner = build_engine(config).runner
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    runner.warmup()
    profile.disable()
    print(f"warm-up {time.perf_counter() - start:.1f}s under cProfile "
          f"(slowest program {runner.slowest_warmup_s:.1f}s)")
    pstats.Stats(profile, stream=sys.stdout).sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
