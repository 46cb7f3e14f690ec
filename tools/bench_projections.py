"""One-row (batch-1 decode) projections: how XLA lowers them and how fast they read the weight.

    python tools/bench_projections.py --models llama-3.2-1b,gemma3-270m

For each projection of a model shape (Q/K/V, output, gate/up, down) and each `one_row` mode of
`jaxgen.models.layers.project` ("off": the plain einsum; "always": as two rows), compiles a
chain of the projection over enough distinct weights to defeat the L2 cache, then prints
which kernels XLA emitted (GEMM fusions or reductions, by XLA's fusion names) and the achieved
read bandwidth of the weight against a copy bandwidth measured in the same run. The chain
carries a dependency from each projection to the next, so every time includes a launch. Each mode's output is checked against "off" first.
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench_offline import load_preset
from device_ceilings import copy_bandwidth
from jaxgen.models.layers import project

L2_BYTES = 256 << 20


def shapes(cfg):
    e, hq, hkv, d, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.intermediate_size)
    return {
        "qkv": ("te,ehcd->thcd", (e,), (e, hkv, hq // hkv + 2, d)),
        "o": ("tk,ke->te", (hq * d,), (hq * d, e)),
        "gate_up": ("te,ecf->tcf", (e,), (e, 2, f)),
        "down": ("tf,fe->te", (f,), (f, e)),
    }


def kernel_kinds(hlo: str) -> str:
    """The matmul-like fusions and custom calls in optimised HLO text, by name stem (XLA names a
    fusion for what it does: `gemm_fusion_dot` is a GEMM, `input_reduce_fusion` a reduction)."""
    stems = collections.Counter()
    for name in re.findall(r"%([\w.\-]+) = \S+ (?:fusion|custom-call)\(", hlo):
        stem = re.sub(r"([._]\d+)+$", "", name)
        if re.search(r"gemm|dot|reduce|cublas|matmul", stem):
            stems[stem] += 1
    return ", ".join(f"{stem} x{n}" for stem, n in stems.most_common(2)) or "-"


def time_chain(fn, weights, x, reps):
    fn(weights, x).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(weights, x).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / len(weights)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama-3.2-1b,gemma3-270m")
    ap.add_argument("--modes", default="off,always")
    ap.add_argument("--rows", type=int, default=1, help="token rows (1 = a batch-1 decode step)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    bandwidth = copy_bandwidth()
    print(f"# {jax.devices()[0].device_kind}, JAX {jax.__version__}, copy {bandwidth:,.0f} GB/s, "
          f"rows {args.rows}")
    print("| model | projection | weight | mode | kernels | µs | GB/s | % copy | max |Δ| |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        cfg = load_preset(name)
        dtype = jnp.dtype(cfg.dtype)
        for proj, (spec, x_tail, w_shape) in shapes(cfg).items():
            w_bytes = int(np.prod(w_shape)) * dtype.itemsize
            copies = max(4, -(-L2_BYTES // w_bytes))
            keys = jax.random.split(jax.random.key(0), copies + 1)
            weights = [0.02 * jax.random.normal(k, w_shape, dtype) for k in keys[:copies]]
            x = jax.random.normal(keys[-1], (args.rows,) + x_tail, dtype)
            want = None
            for mode in args.modes.split(","):
                def chain(ws, x, mode=mode):
                    acc = jnp.zeros((), jnp.float32)
                    for w in ws:  # a dependency per weight so none is skipped
                        y = project(spec, x + acc.astype(x.dtype), w, one_row=mode)
                        acc = acc + 1e-6 * y.reshape(-1)[0].astype(jnp.float32)
                    return acc
                fn = jax.jit(chain)
                hlo = fn.lower(weights, x).compile().as_text()
                one = jax.jit(lambda w, x, mode=mode: project(spec, x, w, one_row=mode))
                got = np.asarray(one(weights[0], x), np.float32)
                if want is None:
                    want = got
                err = float(np.abs(got - want).max())
                t = time_chain(fn, weights, x, args.reps)
                gbps = w_bytes / t / 1e9
                print(f"| {name} | {proj} | {w_bytes / 2**20:.1f} MiB | {mode} | "
                      f"{kernel_kinds(hlo)} | {t * 1e6:.1f} | {gbps:,.0f} | "
                      f"{gbps / bandwidth:.0%} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
