"""From a deployment `Config` to a running engine: the one `build_engine(config)` that `jaxgen
generate`, `jaxgen serve` (both engine modes), batch jobs and every process call.

Resolves what depends on the platform (dtype "auto": bfloat16 on GPU and TPU, float32 on CPU),
turns on the persistent compilation cache, builds the mesh, loads the checkpoint onto it and
constructs the `Engine` (warm-up included when the config asks for it). Prints one line to
stderr per load, as the CLI always has.

Over several processes (`config.distributed`, docs/multi-host.md) process 0 builds the engine
and every other process calls `run_worker(config)` instead: both join the group first, load
only their own shards of the same checkpoint, agree on the model, and take the engine's
settings as process 0 decides them (`settle`); then each builds a runner over the global mesh
and warms it up the same way.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys

import jax
import numpy as np

from jaxgen import checkpoints
from jaxgen.config import Config, EngineConfig
from jaxgen.engine import Engine
from jaxgen.models.sharding import make_mesh
from jaxgen.runtime.compile_cache import enable_compilation_cache
from jaxgen.runtime.runner import ModelRunner, size_page_pool


def resolve_dtype(dtype: str, platform: str | None = None) -> str:
    """"auto" -> bfloat16 on accelerators, float32 on CPU; others unchanged."""
    if dtype != "auto":
        return dtype
    return "float32" if (platform or jax.default_backend()) == "cpu" else "bfloat16"


def is_worker(config: Config) -> bool:
    """Whether this process is one of a group's others (not process 0): it runs `run_worker`,
    with no front end, scheduler or tokenizer of its own."""
    if not config.distributed.enabled:
        return False
    from jaxgen.distributed import resolve

    return resolve(config.distributed).process_id != 0


def start_leader(config: Config):
    """Process 0 of a multi-process config: joins the group and accepts the others (returns
    its `Leader`); None for one process. Raises GroupError on any other process."""
    if not config.distributed.enabled:
        return None
    from jaxgen.distributed import GroupError, Leader, join

    group = join(config)
    if not group.is_leader:
        raise GroupError(f"{group.name}: only process 0 builds an engine; the others run "
                         "`run_worker`")
    leader = Leader(group)
    try:
        leader.start()
    except BaseException:
        leader.abandon()
        raise
    return leader


def load_model(config: Config, group=None):
    """The checkpoint of `config.model` on `config.mesh` (over several processes: this one's
    shards of the global mesh); returns (LoadedModel, mesh or None)."""
    mesh = make_mesh(config.mesh) if config.mesh is not None or group is not None else None
    source = config.model
    loaded = checkpoints.load(source.model, dtype=resolve_dtype(source.dtype), mesh=mesh,
                              cache=source.cache_dir, convert_bundled=group is None)
    how = "converted on first use, then loaded" if loaded.converted else "loaded"
    print(f"jaxgen: {loaded.config.name or loaded.source} {how} from {loaded.source} "
          f"in {loaded.load_seconds:.1f}s", file=sys.stderr, flush=True)
    return loaded, mesh


def build_engine(config: Config, *, longest: int = 0, loaded=None, mesh=None,
                 leader=None) -> Engine:
    """An engine as `config` describes it (not started). `longest`: the longest prompt +
    max_tokens the caller will submit; with max_model_len unset it may raise the default
    (`jaxgen generate` knows its prompts). `loaded`, `mesh`: a model already loaded by
    `load_model(config, leader)`; `leader`: process 0's `start_leader(config)`, when the
    caller started the group itself (else it is started here when the config asks)."""
    if config.compilation_cache_dir != "off":
        enable_compilation_cache(config.compilation_cache_dir)
    leader = leader if loaded is not None else (leader or start_leader(config))
    try:
        if loaded is None:
            loaded, mesh = load_model(config, leader.group if leader else None)
        engine_config = config.engine
        if engine_config.max_model_len is None and longest:
            context = loaded.config.max_position_embeddings
            default = engine_config.resolved(context).max_model_len
            engine_config = dataclasses.replace(engine_config,
                                                max_model_len=min(context, max(longest, default)))
        if leader is not None:
            engine_config = settle(leader.group, engine_config, loaded)
        return Engine(loaded.model, loaded.params, loaded.tokenizer, engine_config, mesh=mesh,
                      name=config.model.name, profile_dir=config.server.profile_dir, group=leader)
    except BaseException:
        if leader is not None:  # the others see process 0 go, and report their own errors
            leader.abandon()
        raise


def run_worker(config: Config, group=None) -> int:
    """Every process of a group but 0: join, load this process's shards, warm up as process 0
    does, then run its plans until it stops the group (returns 0) or the group is lost (this
    process exits non-zero). SIGTERM and SIGINT are ignored here: process 0 leads every stop
    (an orchestrator may signal every process of the group at once). `group`: already joined
    (`jaxgen.distributed.join`), e.g. by a benchmark that used it first."""
    from jaxgen.distributed import Worker, join

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    if config.compilation_cache_dir != "off":
        enable_compilation_cache(config.compilation_cache_dir)
    group = group or join(config)
    worker = Worker(group)
    try:
        worker.connect()
        loaded, mesh = load_model(config, group)
        engine_config = settle(group, config.engine, loaded)
        runner = ModelRunner(loaded.model, loaded.params, engine_config, mesh,
                             sync_dispatch=group.sync_dispatch, reads_tokens=False)
        if engine_config.warmup:
            runner.warmup()
    except BaseException:
        worker.abandon()
        raise
    print(f"jaxgen: {group.name} ready, running process 0's plans", file=sys.stderr, flush=True)
    return worker.serve(runner)


def settle(group, engine_config: EngineConfig, loaded) -> EngineConfig:
    """The engine settings every process of `group` runs with, as process 0 decides them: its
    own (max_model_len resolved) with the smallest page pool any process can hold. First every
    process checks that all loaded the same model (config and replicated weights)."""
    model = loaded.model
    group.agree("model", {"model": model.config.to_dict(), "weights": _replicated_sum(loaded.params)})
    resolved = engine_config.resolved(model.config.max_position_embeddings)
    group.publish(f"pages/{group.process_id}", str(size_page_pool(model, resolved, model.config.dtype)))
    if not group.is_leader:
        return EngineConfig(**json.loads(group.read("engine")))
    pages = min(int(group.read(f"pages/{rank}", f"process {rank}"))
                for rank in range(group.num_processes))
    decided = dataclasses.replace(resolved, num_pages=pages)
    group.publish("engine", json.dumps(dataclasses.asdict(decided)))
    return decided


def _replicated_sum(params) -> float:
    """A fingerprint of the weights every process holds whole (norms, and what the mesh does not
    split): two checkpoints of one architecture differ here."""
    total = 0.0
    for leaf in jax.tree.leaves(params):
        if leaf.is_fully_replicated:
            total += float(np.asarray(leaf.addressable_data(0), np.float64).sum())
    return round(total, 6)
