"""JAX's persistent compilation cache, on by default, so a restarted server skips compiling."""

from __future__ import annotations

import os

import jax

ENV = "JAXGEN_COMPILATION_CACHE_DIR"


def default_dir() -> str:
    return os.environ.get(ENV) or os.path.join(os.path.expanduser("~"), ".cache", "jaxgen", "xla")


def enable_compilation_cache(directory: str | None = None) -> str:
    """Points JAX's persistent cache at `directory` (default: $JAXGEN_COMPILATION_CACHE_DIR or
    ~/.cache/jaxgen/xla) and caches every program, however fast it compiled."""
    directory = directory or default_dir()
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
