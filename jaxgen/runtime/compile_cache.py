"""JAX's persistent compilation cache, on by default, so a restarted server skips compiling."""

from __future__ import annotations

import os

import jax

ENV = "JAXGEN_COMPILATION_CACHE_DIR"
MAX_BYTES_ENV = "JAXGEN_COMPILATION_CACHE_MAX_BYTES"
# Least recently used programs are evicted past this. A bounded cache is also a locked one: JAX
# takes a file lock around each read and write only when eviction is on, and without it a
# process reading an entry that another (a server restarting beside its old engine process, the
# processes of a group on one host) is still writing gets a torn file (JAX warns and recompiles).
DEFAULT_MAX_BYTES = 16 << 30


def default_dir() -> str:
    return os.environ.get(ENV) or os.path.join(os.path.expanduser("~"), ".cache", "jaxgen", "xla")


def enable_compilation_cache(directory: str | None = None) -> str:
    """Points JAX's persistent cache at `directory` (default: $JAXGEN_COMPILATION_CACHE_DIR or
    ~/.cache/jaxgen/xla) and caches every program, however fast it compiled, up to
    $JAXGEN_COMPILATION_CACHE_MAX_BYTES (16 GiB) in all, least recently used evicted first."""
    directory = directory or default_dir()
    os.makedirs(directory, exist_ok=True)
    raw = os.environ.get(MAX_BYTES_ENV, str(DEFAULT_MAX_BYTES))
    try:
        max_bytes = int(raw)
        if max_bytes < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"{MAX_BYTES_ENV}={raw!r}: must be a whole number of bytes >= 1") from None
    _stamp_unstamped_entries(directory)
    jax.config.update("jax_compilation_cache_max_size", max_bytes)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def _stamp_unstamped_entries(directory: str) -> None:
    """A bounded JAX cache keeps each entry's last use in `KEY-atime` beside `KEY-cache`, and
    its eviction scan fails on an entry that has none — and with it every later write, so
    nothing new would be cached. Entries written with no limit set (an earlier jaxgen, or JAX on
    its own) have none: each gets its file's modification time."""
    for name in os.listdir(directory):
        if not name.endswith("-cache"):
            continue
        stamp = os.path.join(directory, name[:-len("-cache")] + "-atime")
        if os.path.exists(stamp):
            continue
        try:
            used = os.stat(os.path.join(directory, name)).st_mtime_ns
        except FileNotFoundError:  # evicted meanwhile by another process
            continue
        partial = f"{stamp}.{os.getpid()}.partial"
        with open(partial, "wb") as f:
            f.write(used.to_bytes(8, "little"))
        os.replace(partial, stamp)
