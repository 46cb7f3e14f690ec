"""Incremental detokenization cost per token: pushing one token at a time against a whole decode
step at a time (as the engine does), on real text through a real tokenizer.

    python tools/bench_detok.py --tokenizer ~/.cache/jaxgen/models/gemma3-270m/tokenizer

`--tokenizer`: a jaxgen tokenizer directory (the `tokenizer/` of a converted checkpoint).
`--text`: the text to encode and stream back (default: this repository's README.md).
`--random-ids N`: stream N seeded random ids instead, as a random-weight model emits them in
the serving benchmarks (many never seen before, byte pieces that form no character).
Prints one row per step size: microseconds per token (best of `--reps`; each rep is a new
request's detokenizer on the same tokenizer, as in a server), and checks that the streamed
text equals `decode()` of the ids (for text only: random bytes that form no character are
spelled by decode() as a whole, see `jaxgen.tokenizer.detokenizer`).
"""

from __future__ import annotations

import argparse
import os
import random
import time

from jaxgen.tokenizer import load_tokenizer
from jaxgen.tokenizer.detokenizer import IncrementalDetokenizer

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")
PROMPT_TOKENS = 8


def stream_cost(tokenizer, ids: list[int], step: int, reps: int, check: bool = True) -> float:
    """Best seconds per token to stream `ids[PROMPT_TOKENS:]` after the first ones, `step` at
    a time."""
    best = float("inf")
    for _ in range(reps):
        detok = IncrementalDetokenizer(tokenizer, ids[:PROMPT_TOKENS])
        start = time.perf_counter()
        text = "".join(detok.push(ids[i:i + step]) for i in range(PROMPT_TOKENS, len(ids), step))
        text += detok.flush()
        best = min(best, time.perf_counter() - start)
        want = tokenizer.decode(ids, skip_special_tokens=True)[
            len(tokenizer.decode(ids[:PROMPT_TOKENS], skip_special_tokens=True)):]
        if check and text != want:
            raise AssertionError(f"step {step}: streamed text differs from decode()")
    return best / (len(ids) - PROMPT_TOKENS)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, metavar="DIR")
    ap.add_argument("--text", default=README, metavar="FILE")
    ap.add_argument("--steps", default="1,4,16", help="tokens per push, comma-separated")
    ap.add_argument("--random-ids", type=int, default=0, metavar="N")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    if args.random_ids and args.random_ids <= PROMPT_TOKENS:
        ap.error(f"random_ids={args.random_ids}: must be 0 (stream text) or > {PROMPT_TOKENS}")
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        if args.random_ids:
            rng = random.Random(0)
            ids = [rng.randrange(tokenizer.vocab_size) for _ in range(args.random_ids)]
        else:
            with open(args.text, encoding="utf-8") as f:
                ids = tokenizer.encode(f.read(), add_bos=False)
        steps = [int(s) for s in args.steps.split(",")]
    except (OSError, ValueError) as e:
        ap.error(str(e))
    if len(ids) <= PROMPT_TOKENS:
        ap.error(f"text={args.text!r}: {len(ids)} tokens, need more than {PROMPT_TOKENS}")
    if any(s < 1 for s in steps) or args.reps < 1:
        ap.error(f"steps={args.steps!r} / reps={args.reps}: must be >= 1")
    what = f"{len(ids)} random ids" if args.random_ids else f"{len(ids)} tokens of text"
    print(f"| tokens per push | us per token | ({what}, {args.tokenizer}) |")
    print("|---|---|---|")
    for step in steps:
        cost = stream_cost(tokenizer, ids, step, args.reps, check=not args.random_ids)
        print(f"| {step} | {cost * 1e6:.2f} | |")


if __name__ == "__main__":
    main()
