"""Greedy outputs of real checkpoints through each attention backend, compared token for token.

    python3 tools/check_backends.py --model gemma3-270m --model smollm2-135m
    python3 tools/check_backends.py --model /path/to/model.gguf --backends reference,gpu

For each model the same weights run the whole engine (continuous batching over the paged
cache: more prompts than slots, chunked prefill, decode) once per backend; every request's
greedy token ids must equal those of the first backend listed (the plain-jnp reference by
default). The prompts include one longer than Gemma 3 270M's 512-token sliding window, so
window masking is exercised in prefill chunks and in decode. Prints one markdown table and
exits 1 if any backend differs.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import jax

PROMPTS = [
    "The history of the printing press begins in",
    "Write a short poem about the sea.",
    "Q: What is 17 times 23?\nA:",
    "def fibonacci(n):\n    ",
    "Les montagnes de la Savoie sont",
    "List three facts about the Moon:\n1.",
    # > 512 tokens: crosses pages and Gemma 3's sliding window.
    "Summarise the following notes.\n" + " ".join(
        f"Note {i}: the committee met on day {i} and agreed on item {i * 7 % 13}." for i in range(48)),
]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where `a` and `b` differ (a length difference counts), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run_backends(config, params, tokenizer, backends: list[str], prompts: list[list[int]],
                 max_tokens: int, **runner) -> dict[str, tuple[list[list[int]], float]]:
    """backend -> (token ids per prompt, seconds) for greedy continuous-batching runs of the
    same weights; `runner`: EngineConfig fields."""
    from jaxgen.config import EngineConfig
    from jaxgen.engine import Engine
    from jaxgen.models import Model
    from jaxgen.sampling_params import SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    out = {}
    for backend in backends:
        engine = Engine(Model(config, attn_backend=backend), params, tokenizer,
                        EngineConfig(**runner))
        start = time.perf_counter()
        completions = engine.generate(prompts, sampling)
        out[backend] = ([list(c.token_ids) for c in completions], time.perf_counter() - start)
    return out


def compare(results: dict[str, tuple[list[list[int]], float]]) -> list[dict]:
    """One row per backend against the first: requests equal, first differing (request, index)."""
    ref_name = next(iter(results))
    ref = results[ref_name][0]
    rows = []
    for backend, (ids, seconds) in results.items():
        diffs = [(r, first_difference(a, b)) for r, (a, b) in enumerate(zip(ids, ref))]
        diffs = [(r, i) for r, i in diffs if i is not None]
        rows.append(dict(backend=backend, requests=len(ids), tokens=sum(map(len, ids)),
                         equal=len(ids) - len(diffs), first_difference=diffs[0] if diffs else None,
                         seconds=seconds, reference=ref_name))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="bundled name or checkpoint path "
                    "(repeatable; default gemma3-270m and smollm2-135m)")
    ap.add_argument("--backends", default="reference,auto",
                    help="comma-separated; the first is what the others must equal")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--max-prefill-tokens", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=0,
                    help="page-table length in tokens (default: just what the prompts need); "
                         "a serving size such as 4096 makes tables far wider than contexts")
    ap.add_argument("--matmul-precision", default="highest",
                    help="jax_default_matmul_precision for the model's own matmuls (default "
                    "highest: no TF32 on GPU, so the backends are compared, not the matmuls)")
    args = ap.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    from jaxgen import checkpoints
    from pallas_kernels import resolve_backend

    backends = list(dict.fromkeys(resolve_backend(b) for b in args.backends.split(",")))
    if len(backends) < 2:
        ap.error(f"backends={args.backends!r}: resolve to {backends} on this platform; "
                 "need two distinct backends to compare (e.g. reference,gpu)")
    models = args.model or ["gemma3-270m", "smollm2-135m"]
    print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}, {platform.python_version()}, "
          f"{args.dtype}, matmul precision {args.matmul_precision}, greedy, {len(PROMPTS)} prompts on {args.slots} slots, "
          f"{args.max_tokens} new tokens each\n")
    print("| model | backend | requests | tokens | equal to reference | first difference "
          "(request, token) | seconds |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    for name in models:
        loaded = checkpoints.load(name, dtype=args.dtype)
        prompts = [loaded.tokenizer.encode(p) for p in PROMPTS]
        longest = max(map(len, prompts))
        max_len = max(longest + args.max_tokens + 16, args.max_model_len)
        results = run_backends(
            loaded.config, loaded.params, loaded.tokenizer, backends, prompts, args.max_tokens,
            num_slots=args.slots, page_size=16, decode_steps=args.decode_steps,
            max_model_len=max_len, num_pages=args.slots * (max_len // 16 + 2) + 1,
            max_prefill_tokens=args.max_prefill_tokens)
        for row in compare(results):
            ok &= row["equal"] == row["requests"]
            diff = "—" if row["first_difference"] is None else str(row["first_difference"])
            print(f"| {name.split('/')[-1]} (longest prompt {longest}) | {row['backend']} | "
                  f"{row['requests']} | {row['tokens']} | {row['equal']}/{row['requests']} | "
                  f"{diff} | {row['seconds']:.1f} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
