"""CPU decode speed: the jaxgen engine next to HF transformers on the same GGUF weights.

    .venv/bin/python tools/bench_cpu.py                    # gemma3-270m, batch 1, greedy
    .venv/bin/python tools/bench_cpu.py --model smollm2-135m --new 128 --reps 3

Both sides decode the same prompt greedily (no EOS stop) in float32 on this machine's CPUs.
jaxgen's engine is sized as `jaxgen serve` sizes it by default (max_model_len 4096: the page
table every step carries), so the figure is the served configuration's.
Decode tok/s = new tokens / (time for prompt + new tokens - time for prompt + 1 token), so the
prompt's prefill is excluded on both sides; the median of `--reps` runs after one warm-up.
jaxgen runs its whole engine (scheduler, paged KV cache, sampling, detokenizer); HF runs
`model.generate` with its default dynamic cache. Also checks that the two produce the same
tokens (the figure is meaningless otherwise). Prints one markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import numpy as np

from jaxgen import checkpoints
from jaxgen.checkpoints.registry import bundled
from jaxgen.config import EngineConfig
from jaxgen.engine import Engine
from jaxgen.sampling_params import SamplingParams
from pallas_kernels import resolve_backend

PROMPT = "The history of the printing press begins in"


def decode_rate(run, new: int, reps: int):
    """`run(n) -> (seconds, token ids)` generates n tokens; returns (decode tok/s excluding
    the prompt's prefill, the token ids of one full run)."""
    run(new + 1)  # warm-up: every shape compiled / every kernel loaded
    first = statistics.median(run(1)[0] for _ in range(reps))
    runs = [run(new + 1) for _ in range(reps)]
    full = statistics.median(t for t, _ in runs)
    return new / (full - first), runs[0][1]


def time_jaxgen(engine: Engine, prompt_ids, new: int, reps: int):
    def run(n):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        out = engine.generate([prompt_ids], params)[0]
        return time.perf_counter() - start, list(out.token_ids)

    return decode_rate(run, new, reps)


def time_hf(model, prompt_ids, new: int, reps: int):
    import torch

    ids = torch.tensor([prompt_ids])

    def run(n):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, num_beams=1)
        return time.perf_counter() - start, out[0, len(prompt_ids):].tolist()

    return decode_rate(run, new, reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--new", type=int, default=64, help="decode tokens timed")
    ap.add_argument("--decode-steps", type=int, default=8, help="jaxgen tokens per device call")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-model-len", type=int, default=4096,
                    help="jaxgen's page-table length (default: what `jaxgen serve` and "
                         "`jaxgen generate` use for this model)")
    ap.add_argument("--attn-backend", default="auto", help="auto (CPU: xla) | reference | xla")
    ap.add_argument("--embed-layout", default="auto",
                    help="auto (vocab_major) | embed_major (faster logits on CPU, see Model)")
    args = ap.parse_args()

    loaded = checkpoints.load(args.model, attn_backend=args.attn_backend,
                              embed_layout=args.embed_layout)
    prompt_ids = loaded.tokenizer.encode(PROMPT)
    config = EngineConfig(num_slots=1, page_size=16,
                          max_model_len=max(args.max_model_len, len(prompt_ids) + args.new + 1),
                          decode_steps=args.decode_steps, max_prefill_tokens=64)
    engine = Engine(loaded.model, loaded.params, loaded.tokenizer, config)
    ours, our_ids = time_jaxgen(engine, prompt_ids, args.new, args.reps)

    import torch
    from transformers import AutoModelForCausalLM

    path = bundled(args.model).locate_gguf()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                              gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    theirs, hf_ids = time_hf(hf, prompt_ids, args.new, args.reps)
    same = int(np.argmin(np.array(our_ids) == np.array(hf_ids))) if our_ids != hf_ids else None

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"JAX {jax.__version__}, torch {torch.__version__}, float32, batch 1, greedy, "
          f"prompt {len(prompt_ids)} tokens, {args.new} decode tokens timed, jaxgen "
          f"max_model_len {runner.max_model_len}, attention {resolve_backend(args.attn_backend)}, "
          f"embedding table {loaded.model.embed_layout}\n")
    print("| model | jaxgen tok/s | HF transformers tok/s | speed-up | same tokens |")
    print("|---|---|---|---|---|")
    agree = "yes" if same is None else f"first {same} of {args.new + 1}"
    print(f"| {args.model} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x | {agree} |")


if __name__ == "__main__":
    main()
