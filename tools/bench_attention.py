"""Ragged paged attention: time, bytes moved and achieved bandwidth per backend.

    python tools/bench_attention.py                       # the default sweep
    python tools/bench_attention.py --mode decode --batches 8,32 --contexts 4096 \
        --heads 32/8/128 --page-sizes 16 --backends gpu,reference

Sweeps batch x context x (Hq/Hkv/D) x page size, for decode steps (one new token per sequence)
and prefill chunks (`--chunk` new tokens per sequence on top of the context). Every call is the
whole public op: the fused K/V write plus attention. Bytes moved = K/V read (each sequence's
visible context once) + new K/V written + q read + out written. % copy is against a copy
bandwidth measured in the same run. Each config first checks the backend against the reference
on the same inputs (max |diff| / max |ref|), then times it: a jitted loop of calls rotating over
enough page pools to defeat the L2 cache, each timed run moving >= 8 GB (at most 400 calls;
shorter runs read up to ~15 points low on an H200), median of several runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from device_ceilings import copy_bandwidth, read_bandwidth
from pallas_kernels import ragged_paged_attention

L2_BYTES = 256 << 20  # rotate pools until this much is touched per round


def make_inputs(key, batch, context, chunk, hq, hkv, d, page_size, copies, table_len=0):
    """Random bf16 pools (scattered pages, page 0 null) and one step's metadata. The page
    table covers `max(table_len, context + chunk)` tokens, entries past the context on the null
    page (as in the engine, whose table covers max_model_len)."""
    kv_len = context + chunk
    pages_per_seq = -(-kv_len // page_size)
    num_pages = 1 + batch * pages_per_seq
    keys = jax.random.split(key, copies + 4)
    pools = tuple(jax.random.normal(keys[i], (num_pages, page_size, 2 * hkv, d), jnp.bfloat16)
                  for i in range(copies))
    perm = np.random.default_rng(0).permutation(np.arange(1, num_pages))
    table = perm.reshape(batch, pages_per_seq)
    width = max(pages_per_seq, -(-table_len // page_size))
    table = np.pad(table, ((0, 0), (0, width - pages_per_seq)))
    page_indices = jnp.asarray(table, jnp.int32)
    t = batch * chunk
    q = jax.random.normal(keys[-1], (t, hq, d), jnp.bfloat16)
    k = jax.random.normal(keys[-2], (t, hkv, d), jnp.bfloat16)
    v = jax.random.normal(keys[-3], (t, hkv, d), jnp.bfloat16)
    kv_lens = jnp.full((batch,), kv_len, jnp.int32)
    cu = jnp.arange(batch + 1, dtype=jnp.int32) * chunk
    return pools, (q, k, v), (kv_lens, page_indices, cu, jnp.array([batch], jnp.int32))


def bytes_moved(batch, context, chunk, hq, hkv, d, window=None):
    seen = context + chunk if window is None else min(window + chunk - 1, context + chunk)
    kv_read = batch * seen * 2 * hkv * d * 2
    kv_write = batch * chunk * 2 * hkv * d * 2
    q_out = 2 * batch * chunk * hq * d * 2
    return kv_read + kv_write + q_out


BLOCK_FIELDS = dict(ppb="pages_per_block", stages="num_stages", warps="num_warps",
                    programs="target_programs", splits="num_splits", bq="block_q",
                    minblocks="min_split_blocks")


def parse_blocks(spec: str):
    """'ppb=2,stages=3,warps=4,programs=528,minblocks=4,bq=16' -> GpuBlockSizes ('' -> defaults); a
    ValueError naming the spec and the bad item otherwise."""
    from pallas_kernels.ragged_paged_attention.gpu import GpuBlockSizes

    fields = {}
    for item in (kv for kv in spec.split(",") if kv):
        key, _, value = item.partition("=")
        if key not in BLOCK_FIELDS or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--gpu-blocks {spec!r}: bad item {item!r}; expected NAME=N with N "
                             f">= 1 and NAME one of {', '.join(BLOCK_FIELDS)}")
        fields[BLOCK_FIELDS[key]] = int(value)
    return GpuBlockSizes(**fields)


def time_backend(backend, pools, qkv, md, *, decode_only, reps, inner, block_sizes=None):
    sm_scale = qkv[0].shape[-1] ** -0.5
    attend = functools.partial(ragged_paged_attention, sm_scale=sm_scale, backend=backend,
                               decode_only=decode_only, block_sizes=block_sizes)

    @functools.partial(jax.jit, donate_argnums=0)
    def loop(pools, qkv, md):
        def body(_, carry):
            pools, acc = carry
            new = []
            for pool in pools:  # unrolled: a different pool per call
                out, pool = attend(*qkv, pool, *md)
                acc = acc + out[0, 0, 0].astype(jnp.float32)  # a dependency XLA cannot drop
                new.append(pool)
            return tuple(new), acc
        return jax.lax.fori_loop(0, inner, body, (pools, jnp.zeros((), jnp.float32)))

    pools, acc = loop(pools, qkv, md)
    jax.block_until_ready(acc)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        pools, acc = loop(pools, qkv, md)
        jax.block_until_ready(acc)
        times.append((time.perf_counter() - start) / (inner * len(pools)))
    return statistics.median(times), pools


def check_against_reference(backend, pools, qkv, md, decode_only, block_sizes=None):
    sm_scale = qkv[0].shape[-1] ** -0.5
    got = jax.jit(functools.partial(ragged_paged_attention, sm_scale=sm_scale, backend=backend,
                                    decode_only=decode_only, block_sizes=block_sizes))(
        *qkv, pools[0], *md)[0]
    want = jax.jit(functools.partial(ragged_paged_attention, sm_scale=sm_scale,
                                     backend="reference"))(*qkv, pools[0], *md)[0]
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if not np.isfinite(got).all():
        return float("nan")
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def parse_ints(s):
    return [int(x) for x in s.split(",") if x]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", default="decode,prefill")
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--contexts", default="1024,4096,8192")
    ap.add_argument("--heads", default="32/8/128,8/1/256", help="Hq/Hkv/D,...")
    ap.add_argument("--page-sizes", default="16,32")
    ap.add_argument("--chunk", type=int, default=512, help="new tokens per sequence (prefill)")
    ap.add_argument("--prefill-batches", default="1,4")
    ap.add_argument("--table-len", type=int, default=0,
                    help="tokens each page table covers (the engine's max_model_len); default "
                         "just the context")
    ap.add_argument("--backends", default="gpu,reference")
    ap.add_argument("--reference-max-bytes", type=float, default=2e9,
                    help="skip timing the reference above this much K/V (it is slow)")
    ap.add_argument("--gpu-blocks", default="",
                    help="';'-separated GPU block sizes to compare, e.g. 'ppb=2,stages=3;ppb=4'")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", help="also write JSON lines here")
    args = ap.parse_args(argv)
    try:  # bad block specs fail before any device work
        for spec in args.gpu_blocks.split(";") if args.gpu_blocks else []:
            parse_blocks(spec)
    except ValueError as e:
        ap.error(str(e))

    read, bandwidth = read_bandwidth(), copy_bandwidth()
    print(f"# {jax.devices()[0].device_kind}, JAX {jax.__version__}, read {read:,.0f} GB/s, "
          f"copy {bandwidth:,.0f} GB/s")
    rows = []
    for mode in args.mode.split(","):
        decode = mode == "decode"
        chunk = 1 if decode else args.chunk
        for heads in args.heads.split(","):
            hq, hkv, d = (int(x) for x in heads.split("/"))
            for page_size in parse_ints(args.page_sizes):
                for batch in parse_ints(args.batches if decode else args.prefill_batches):
                    for context in parse_ints(args.contexts):
                        kv_bytes = batch * (context + chunk) * 2 * hkv * d * 2
                        copies = max(1, min(8, -(-L2_BYTES // kv_bytes)))
                        pools, qkv, md = make_inputs(jax.random.key(batch + context), batch,
                                                     context, chunk, hq, hkv, d, page_size,
                                                     copies, args.table_len)
                        moved = bytes_moved(batch, context, chunk, hq, hkv, d)
                        variants = [(b, "") for b in args.backends.split(",")]
                        if args.gpu_blocks:
                            variants = [(b, spec) for b, _ in variants
                                        for spec in (args.gpu_blocks.split(";")
                                                     if b == "gpu" else [""])]
                        for backend, spec in variants:
                            if backend == "reference" and kv_bytes > args.reference_max_bytes:
                                continue
                            blocks = parse_blocks(spec) if backend == "gpu" else None
                            err = (0.0 if backend == "reference" else check_against_reference(
                                backend, pools, qkv, md, decode, blocks))
                            inner = max(1, min(400, int(8e9 // max(moved * copies, 1))))
                            sec, pools = time_backend(backend, pools, qkv, md, decode_only=decode,
                                                      reps=args.reps, inner=inner,
                                                      block_sizes=blocks)
                            gbs = moved / sec / 1e9
                            row = dict(mode=mode, backend=backend + (f"[{spec}]" if spec else ""),
                                       batch=batch, context=context,
                                       chunk=chunk, hq=hq, hkv=hkv, d=d, page_size=page_size,
                                       us=sec * 1e6, mbytes=moved / 1e6, gbs=gbs,
                                       pct_read=100 * gbs / read,
                                       pct_copy=100 * gbs / bandwidth, rel_err=err)
                            rows.append(row)
                            print(json.dumps(row), flush=True)
                        del pools
    print(f"\n{jax.devices()[0].device_kind}, JAX {jax.__version__}, bf16 K/V, read bandwidth "
          f"{read:,.0f} GB/s, copy bandwidth {bandwidth:,.0f} GB/s (measured in this run)\n")
    print("| mode | backend | B | ctx | Hq/Hkv/D | page | µs | MB moved | GB/s | % read | % copy "
          "| rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['backend']} | {r['batch']} | {r['context']} | "
              f"{r['hq']}/{r['hkv']}/{r['d']} | {r['page_size']} | {r['us']:,.1f} | "
              f"{r['mbytes']:,.1f} | {r['gbs']:,.0f} | {r['pct_read']:.0f}% | {r['pct_copy']:.0f}% | "
              f"{r['rel_err']:.1e} |")
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
