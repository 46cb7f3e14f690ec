"""From a deployment `Config` to a running engine: the one `build_engine(config)` that `jaxgen
generate`, `jaxgen serve` (both engine modes), batch jobs and every process call.

Resolves what depends on the platform (dtype "auto": bfloat16 on GPU and TPU, float32 on CPU),
turns on the persistent compilation cache, builds the mesh, loads the checkpoint onto it and
constructs the `Engine` (warm-up included when the config asks for it). Prints one line to
stderr per load, as the CLI always has.
"""

from __future__ import annotations

import dataclasses
import sys

import jax

from jaxgen import checkpoints
from jaxgen.config import Config
from jaxgen.engine import Engine
from jaxgen.models.sharding import make_mesh
from jaxgen.runtime.compile_cache import enable_compilation_cache


def resolve_dtype(dtype: str, platform: str | None = None) -> str:
    """"auto" -> bfloat16 on accelerators, float32 on CPU; others unchanged."""
    if dtype != "auto":
        return dtype
    return "float32" if (platform or jax.default_backend()) == "cpu" else "bfloat16"


def load_model(config: Config):
    """The checkpoint of `config.model` on `config.mesh`; returns (LoadedModel, mesh or None)."""
    mesh = make_mesh(config.mesh) if config.mesh is not None else None
    source = config.model
    loaded = checkpoints.load(source.model, dtype=resolve_dtype(source.dtype), mesh=mesh,
                              cache=source.cache_dir)
    how = "converted on first use, then loaded" if loaded.converted else "loaded"
    print(f"jaxgen: {loaded.config.name or loaded.source} {how} from {loaded.source} "
          f"in {loaded.load_seconds:.1f}s", file=sys.stderr, flush=True)
    return loaded, mesh


def build_engine(config: Config, *, longest: int = 0, loaded=None, mesh=None) -> Engine:
    """An engine as `config` describes it (not started). `longest`: the longest prompt +
    max_tokens the caller will submit; with max_model_len unset it may raise the default
    (`jaxgen generate` knows its prompts). `loaded`, `mesh`: a model already loaded by
    `load_model(config)`."""
    if config.compilation_cache_dir != "off":
        enable_compilation_cache(config.compilation_cache_dir)
    if loaded is None:
        loaded, mesh = load_model(config)
    engine_config = config.engine
    if engine_config.max_model_len is None and longest:
        context = loaded.config.max_position_embeddings
        default = engine_config.resolved(context).max_model_len
        engine_config = dataclasses.replace(engine_config,
                                            max_model_len=min(context, max(longest, default)))
    return Engine(loaded.model, loaded.params, loaded.tokenizer, engine_config, mesh=mesh,
                  name=config.model.name, profile_dir=config.server.profile_dir)
