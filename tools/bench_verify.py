"""What a speculative verify step costs against a decode token, by context length.

    python tools/bench_verify.py --model smollm2-135m --contexts 0,128,256,512,900 \
        [--num-speculative-tokens 4] [--dtype float32] [--reps 9]

One request (one slot) at each context: the compiled `generate` program (decode_steps tokens
per call; the time per token) and the one-request verify program (1 + K rows), the best of
`--reps` calls each (`ModelRunner.step_times`). Context 0 is what warm-up measures to set the
acceptance threshold (`Engine.verify_cost`). The ratio is the price of one verify in decode
tokens: a drafting request gains while it emits more tokens per verify than that.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", default="0,128,256,512,900",
                   help="comma-separated positions of the request (tokens before the step)")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--out-json", default=None)
    args = p.parse_args(argv)

    import jax

    from jaxgen import checkpoints
    from jaxgen.config import EngineConfig
    from jaxgen.engine import Engine

    try:
        contexts = [int(c) for c in args.contexts.split(",")]
    except ValueError:
        contexts = []
    if not contexts or min(contexts) < 0:
        p.error(f"--contexts {args.contexts!r}: must be comma-separated integers >= 0")
    if args.reps < 1:
        p.error(f"--reps {args.reps}: must be >= 1")
    loaded = checkpoints.load(args.model, dtype=args.dtype)
    max_len = max(contexts) + args.num_speculative_tokens + 64
    engine = Engine(loaded.model, loaded.params, loaded.tokenizer, EngineConfig(
        num_slots=1, max_model_len=max_len, num_pages=-(-max_len // 16) + 8,
        max_prefill_tokens=512, warmup=True, speculative="ngram",
        num_speculative_tokens=args.num_speculative_tokens))
    rows = []
    for context in contexts:
        token_s, verify_s = engine.runner.step_times(context, reps=args.reps)
        rows.append(dict(model=args.model, context=context, k=args.num_speculative_tokens,
                         decode_token_ms=token_s * 1e3, verify_ms=verify_s * 1e3,
                         verify_in_tokens=verify_s / token_s, dtype=args.dtype,
                         device=jax.devices()[0].platform, jax=jax.__version__))
        print(f"{args.model} context {context:5d}: decode {token_s * 1e3:6.1f} ms/token, verify "
              f"(1 + {args.num_speculative_tokens} rows) {verify_s * 1e3:6.1f} ms = "
              f"{verify_s / token_s:.2f} decode tokens", flush=True)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
