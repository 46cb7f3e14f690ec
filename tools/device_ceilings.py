"""Ceilings measured on the device a benchmark runs on: read bandwidth, copy bandwidth, bf16
matmul rate.

Benchmarks report MBU / MFU against these, measured in the same run, never datasheet figures.
Decode reads weights and K/V and writes little, so its MBU is against the read stream (a
reduction over a few GB); a copy reads and writes, so "% of copy" can pass 100% and is reported
beside it, not instead.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def _median_seconds(fn, arg, reps: int, inner: int = 10) -> float:
    jax.block_until_ready(fn(arg))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(arg)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def copy_bandwidth(reps: int = 5) -> float:
    """Device-to-device copy GB/s (bytes read + written) of a 2 GiB bf16 array."""
    n = 1 << 30
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    return 4 * n / _median_seconds(jax.jit(lambda a: a + 1), x, reps) / 1e9


def read_bandwidth(gib: float = 2.0, reps: int = 5) -> float:
    """Read-stream GB/s: row sums (f32) of a `gib` GiB bf16 array — every byte read once, an
    output 1/8192 of the input written."""
    n = int(gib * (1 << 30)) // 2 // 8192 * 8192
    x = jax.random.normal(jax.random.key(2), (n // 8192, 8192), jnp.bfloat16)
    return 2 * n / _median_seconds(jax.jit(lambda a: jnp.sum(a, axis=1, dtype=jnp.float32)), x,
                                   reps) / 1e9


def matmul_tflops(n: int = 8192, reps: int = 5) -> float:
    """bf16 matmul TFLOP/s of an n x n x n product (f32 accumulation)."""
    x = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    return 2 * n ** 3 / _median_seconds(jax.jit(lambda a: a @ a), x, reps) / 1e12
