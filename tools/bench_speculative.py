"""Speculative decoding (n-gram drafts) against plain decoding, side by side in one process on
the same loaded model: output tok/s with and without, the acceptance rate and the mean accepted
length per verify step, per workload (tools/spec_workloads.py) and batch size.

    python tools/bench_speculative.py --models smollm2-135m,gemma3-270m --batches 1,8 \\
        [--prompts 3] [--max-tokens 96] [--reps 3] [--dtype float32] \\
        [--num-speculative-tokens 4] [--chat]

`--chat` sends each prompt as one user message through the model's chat template (what an
instruct model such as SmolLM2-135M-Instruct receives from `/v1/chat/completions`); without it
the prompts are plain text (the bundled Gemma 3 270M is a base model: it continues text).

Each (model, batch, workload) cell runs the same prompts greedily through both engines, plain
first, alternating for --reps rounds (the best round of each is kept), after one untimed round
that compiles. Greedy outputs are compared token for token (they must be identical). The
default 3 prompts per slot give a batch-1 cell one prompt of each copy-heavy kind.

`ceiling` is how much of the outputs the drafts can cover: the plain engine's greedy outputs
replayed through the n-gram proposer (same K and n-gram lengths, drafting at every token, never
cooling down), each step a verify where it drafts (its accepted drafts plus one token) and a
one-token decode where it does not: output tokens per step. It is the speedup the engine would
reach were a verify step as cheap as a decode token and drafts looked up after every token (a
memory-bound accelerator at batch 1 comes close to the first). `at verify cost`: the same
replay with each verify step at the cost warm-up measured (`Engine.verify_cost`, in decode
tokens), what drafting at every token would give on this device. A model that paraphrases has
a low ceiling whatever the engine does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from spec_workloads import copy_heavy, free_writing  # noqa: E402

from jaxgen.engine_api import EngineObserver  # noqa: E402


class VerifyCount(EngineObserver):
    """Counts verify steps (one per request per step that verified drafts)."""

    count = 0

    def on_drafts(self, drafts, accepted):
        self.count += 1


def encode_prompts(tok, texts: list[str], chat: bool) -> list[list[int]]:
    """Token ids of the workload's prompts: plain text, or each one user message through the
    model's chat template (`chat`)."""
    if chat:
        return [tok.encode_chat([{"role": "user", "content": t}]) for t in texts]
    return [tok.encode(t) for t in texts]


def ngram_replay(prompts, outputs, k: int, ngram_max: int, ngram_min: int) -> tuple[int, int, int]:
    """(output tokens, verify steps, decode steps) when `outputs` (the greedy continuations of
    `prompts`) are replayed through the n-gram proposer drafting at every token: a verify step
    emits the drafts that match the output plus one token, a decode step (nothing drafted) one
    token."""
    from jaxgen.scheduler.ngram import NgramConfig, NgramProposer

    config = NgramConfig(num_speculative_tokens=k, ngram_max=ngram_max, ngram_min=ngram_min,
                         min_acceptance=0.0)  # never cools down
    tokens = verifies = decodes = 0
    for prompt, out in zip(prompts, outputs):
        proposer, i = NgramProposer(config, prompt), 0
        while i < len(out):
            drafts = proposer.propose(len(out) - i - 1)
            accepted = next((j for j, d in enumerate(drafts) if d != out[i + j]), len(drafts))
            proposer.extend(out[i:i + accepted + 1])
            i += accepted + 1
            verifies += bool(drafts)
            decodes += not drafts
        tokens += len(out)
    return tokens, verifies, decodes


def replayed_speedup(replay: tuple[int, int, int], verify_cost: float = 1.0) -> float:
    """The speedup of drafting at every token on a replay (`ngram_replay`), a verify step
    costing `verify_cost` decode tokens: 1.0 where nothing would be accepted, at most K + 1."""
    tokens, verifies, decodes = replay
    return tokens / (verifies * verify_cost + decodes) if tokens else 1.0


def run(engine, prompts, params):
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    return out, time.perf_counter() - start


def bench_model(name, args) -> list[dict]:
    import jax

    from jaxgen import checkpoints
    from jaxgen.config import EngineConfig
    from jaxgen.engine import Engine
    from jaxgen.sampling_params import SamplingParams

    loaded = checkpoints.load(name, dtype=args.dtype)
    tok = loaded.tokenizer
    rows = []
    for batch in args.batches:
        workloads = {"copy-heavy": copy_heavy(batch * args.prompts, seed=batch),
                     "free-writing": free_writing(batch * args.prompts, seed=batch)}
        # Warmed up as `serve` does: nothing compiles inside a timing, and the speculative
        # engine sets its acceptance threshold from the verify cost it measures.
        base = dict(num_slots=batch, max_model_len=1024, num_pages=64 * batch + 64,
                    max_prefill_tokens=512, warmup=True)
        engines = {
            "plain": Engine(loaded.model, loaded.params, tok, EngineConfig(**base)),
            "ngram": Engine(loaded.model, loaded.params, tok, EngineConfig(
                **base, speculative="ngram", num_speculative_tokens=args.num_speculative_tokens,
                ngram_max=args.ngram_max, ngram_min=args.ngram_min))}
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        for workload, texts in workloads.items():
            prompts = encode_prompts(tok, texts, args.chat)
            for e in engines.values():
                run(e, prompts[:batch], params)  # compile the shapes this cell uses
            best = {k: float("inf") for k in engines}
            outputs = {}
            s = engines["ngram"].scheduler
            drafted0, accepted0 = s.num_draft_tokens, s.num_accepted_draft_tokens
            verifies = VerifyCount()
            engines["ngram"].observers.append(verifies)
            for _ in range(args.reps):
                for key, e in engines.items():
                    out, seconds = run(e, prompts, params)
                    best[key] = min(best[key], seconds)
                    outputs[key] = [c.token_ids for c in out]
            tokens = sum(len(t) for t in outputs["plain"])
            drafted = s.num_draft_tokens - drafted0
            accepted = s.num_accepted_draft_tokens - accepted0
            rows.append(dict(
                model=name, batch=batch, workload=workload, chat=args.chat, prompts=len(prompts),
                max_tokens=args.max_tokens, plain_tok_s=tokens / best["plain"],
                ngram_tok_s=tokens / best["ngram"], speedup=best["plain"] / best["ngram"],
                acceptance=accepted / drafted if drafted else 0.0,
                accepted_per_verify=accepted / verifies.count if verifies.count else 0.0,
                identical=outputs["plain"] == outputs["ngram"],
                device=jax.devices()[0].platform,
                dtype=args.dtype, jax=jax.__version__))
            replay = ngram_replay(prompts, outputs["plain"], args.num_speculative_tokens,
                                  args.ngram_max, args.ngram_min)
            cost = engines["ngram"].verify_cost
            rows[-1].update(verify_cost=cost, ceiling=replayed_speedup(replay),
                            at_verify_cost=replayed_speedup(replay, cost))
            r = rows[-1]
            cell = workload + (" chat" if args.chat else "")
            print(f"{name:>14} B={batch:<3} {cell:>17}: plain {r['plain_tok_s']:7.1f} tok/s, "
                  f"ngram {r['ngram_tok_s']:7.1f} tok/s = {r['speedup']:.2f}x; acceptance "
                  f"{r['acceptance']:.0%}, {r['accepted_per_verify']:.2f} accepted per verify; "
                  f"ceiling {r['ceiling']:.2f}x, {r['at_verify_cost']:.2f}x at a verify of "
                  f"{r['verify_cost']:.2f} tokens; identical={r['identical']}", flush=True)
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,gemma3-270m")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (slots)")
    p.add_argument("--prompts", type=int, default=3, help="prompts per slot in each cell")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--ngram-max", type=int, default=4)
    p.add_argument("--ngram-min", type=int, default=2)
    p.add_argument("--chat", action="store_true",
                   help="prompts as one user message through the model's chat template")
    p.add_argument("--out-json", default=None)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked: each count a positive integer, named with its value."""
    p = parser()
    args = p.parse_args(argv)
    given = args.batches
    try:
        args.batches = [int(b) for b in given.split(",")]
    except ValueError:
        args.batches = []
    if not args.batches or min(args.batches) < 1:
        p.error(f"--batches {given!r}: must be comma-separated integers >= 1")
    for flag in ("prompts", "max_tokens", "reps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = [r for name in args.models.split(",") for r in bench_model(name, args)]
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
