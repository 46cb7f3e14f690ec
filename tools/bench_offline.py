"""Offline decode throughput of the full engine (paged KV cache, scheduler, sampling) on
random-weight model shapes, with MBU against a copy bandwidth measured in the same run.

    python tools/bench_offline.py --models llama-3.2-1b,llama-3-8b --batches 1,8,32,128

For each (model, batch): B requests of `--prompt` random tokens generate `--new` tokens each
(greedy, ignore_eos). Decode time = time(prompt + new tokens) - time(prompt + 1 token), so
prefill is excluded as in the dense baseline (../shared/peers). MBU counts the bytes one decode
step must read: all weights but the embedding table, plus the live K/V of every sequence.
Prints one markdown table (and JSON lines with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from device_ceilings import copy_bandwidth, read_bandwidth
from jaxgen.config import EngineConfig
from jaxgen.engine import Engine
from pallas_kernels import resolve_backend
from jaxgen.models import Model, ModelConfig
from jaxgen.sampling_params import SamplingParams

PRESETS = os.path.join(os.path.dirname(__file__), "..", "configs", "models")


class RandomTokenTokenizer:
    """Stands in for a tokenizer on random-weight shapes: no stop ids, no text."""

    stop_ids = frozenset()

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return ""

    def skips(self, id: int) -> bool:  # the detokenizer's question: no token is special here
        return False


def load_preset(name_or_path: str) -> ModelConfig:
    """A shape preset by name (configs/models/NAME.json) or a config JSON path."""
    path = name_or_path if name_or_path.endswith(".json") else os.path.join(PRESETS, f"{name_or_path}.json")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(PRESETS) if f.endswith(".json"))
        raise ValueError(f"shape={name_or_path!r}: no such preset or file; presets: {', '.join(known)}")
    return ModelConfig.from_json_file(path)


def random_params(model: Model, seed: int = 0):
    """Random weights leaf by leaf (one small jit per distinct shape, not one program for the
    whole model, whose compile takes minutes at 8B): normal(0, 0.02) matrices; norm scales at
    their identity (1, or 0 where the norm is zero-centred)."""
    zero_centred = model.config.architecture == "gemma3"
    dtype = jnp.dtype(model.config.dtype)
    normal = jax.jit(lambda key, shape: 0.02 * jax.random.normal(key, shape, dtype),
                     static_argnums=1)
    leaves, tree = jax.tree.flatten(model.abstract_params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [jnp.full(a.shape, 0.0 if zero_centred else 1.0, a.dtype) if len(a.shape) == 1
           else normal(key, a.shape).astype(a.dtype) for a, key in zip(leaves, keys)]
    return jax.tree.unflatten(tree, out)


def step_bytes(cfg: ModelConfig, params, batch: int, context: float) -> float:
    itemsize = jnp.dtype(cfg.dtype).itemsize
    weights = sum(a.size for a in jax.tree.leaves(params)) * itemsize
    if not cfg.tie_embeddings:  # a tied table is read in full as the output head
        weights -= cfg.vocab_size * cfg.hidden_size * itemsize  # the input table is only gathered
    kv_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * itemsize
    return weights + batch * context * kv_per_token


def run(engine: Engine, prompts, new: int) -> float:
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(c.token_ids) == new for c in out)
    return elapsed


def bench(name: str, batch: int, args, read: float, copy: float) -> dict:
    cfg = load_preset(name)
    model = Model(cfg, attn_backend=args.attn_backend)
    params = random_params(model, seed=0)
    config = EngineConfig(num_slots=batch, max_model_len=args.prompt + args.new + 16,
                          decode_steps=args.decode_steps,
                          max_prefill_tokens=min(args.max_prefill_tokens, args.prompt * batch),
                          memory_utilization=0.6, warmup=True, overlap_launch=args.overlap_launch)
    engine = Engine(model, params, RandomTokenTokenizer(), config)
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(0, cfg.vocab_size, args.prompt).tolist() for _ in range(batch)]
    run(engine, prompts, args.decode_steps + 1)  # first use of every shape
    prefill_only = statistics.median(run(engine, prompts, 1) for _ in range(2))
    full = statistics.median(run(engine, prompts, args.new + 1) for _ in range(args.reps))
    decode = full - prefill_only
    step = decode / args.new
    context = args.prompt + (args.new + 1) / 2
    moved = step_bytes(cfg, params, batch, context)
    return dict(model=name, batch=batch, prompt=args.prompt, new=args.new,
                decode_steps=args.decode_steps, overlap_launch=args.overlap_launch,
                tok_s=batch * args.new / decode,
                step_ms=step * 1e3, mbu=moved / step / 1e9 / read,
                pct_copy=moved / step / 1e9 / copy,
                compilations_after_warmup=engine.runner.compilations_after_warmup,
                pages=engine.runner.num_pages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-3.2-1b,llama-3-8b")
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--max-prefill-tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--attn-backend", default="auto", help="auto | reference | gpu | tpu")
    ap.add_argument("--overlap-launch", action="store_true",
                    help="EngineConfig.overlap_launch: steps dispatched from a launcher thread")
    ap.add_argument("--ceiling-gib", type=float, default=2.0,
                    help="size of the read-ceiling reduction (a few GB on a GPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    read, copy = read_bandwidth(args.ceiling_gib), copy_bandwidth()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}, read {read:.0f} GB/s, copy "
          f"{copy:.0f} GB/s, attention {resolve_backend(args.attn_backend)}", flush=True)
    print("| model | batch | prompt | new | tok/s | step ms | MBU (read) | % of copy | recompiles |",
          flush=True)
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            r = bench(name, batch, args, read, copy)
            print(f"| {name} | {batch} | {r['prompt']} | {r['new']} | {r['tok_s']:,.0f} | "
                  f"{r['step_ms']:.2f} | {r['mbu']:.0%} | {r['pct_copy']:.0%} | "
                  f"{r['compilations_after_warmup']} |", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(dict(r, device=dev.device_kind, jax=jax.__version__,
                                            read_GBps=read, copy_GBps=copy)) + "\n")


if __name__ == "__main__":
    main()
