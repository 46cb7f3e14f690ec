"""`jaxgen` command line: `generate` and `convert`.

User mistakes (bad flags, missing or broken checkpoints, unknown models) print one line naming
the problem and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="bundled model name (gemma3-270m, smollm2-135m) or a path to a .gguf file, "
                        "HF checkpoint dir or jaxgen checkpoint dir (default: gemma3-270m)")
    p.add_argument("--cache-dir", default=None,
                   help="where bundled models are converted on first use "
                        "(default: $JAXGEN_CACHE_DIR or ~/.cache/jaxgen)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="parameter and activation dtype")
    p.add_argument("--mesh", default=None,
                   help="device mesh as DATA,MODEL (e.g. 1,8); default: all devices on model")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxgen", description="JAX-native LLM generation")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete prompts with a model")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    _add_model_args(gen)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--chat", action="store_true",
                     help="wrap each prompt as a user message in the model's chat template")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object per prompt (prompt, text, token_ids, finish_reason)")
    gen.add_argument("--page-size", type=int, default=16)
    gen.add_argument("--decode-steps", type=int, default=8,
                     help="tokens generated per device call (on-device loop)")

    conv = sub.add_parser("convert", help="write a model as a jaxgen (Orbax) checkpoint")
    conv.add_argument("src", help="bundled model name, .gguf file or HF checkpoint dir")
    conv.add_argument("dst", help="output directory")
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    return parser


def _load(args):
    from jaxgen import checkpoints
    from jaxgen.models.sharding import make_mesh

    mesh = make_mesh(args.mesh) if args.mesh else None
    loaded = checkpoints.load(args.model or checkpoints.DEFAULT_MODEL, dtype=args.dtype,
                              mesh=mesh, cache=args.cache_dir)
    how = "converted on first use, then loaded" if loaded.converted else "loaded"
    print(f"jaxgen: {loaded.config.name or loaded.source} {how} from {loaded.source} "
          f"in {loaded.load_seconds:.1f}s", file=sys.stderr)
    return loaded


def cmd_generate(args) -> int:
    from jaxgen.generate import Generator

    loaded = _load(args)
    tok = loaded.tokenizer
    if args.chat:
        ids = [tok.encode_chat([{"role": "user", "content": p}]) for p in args.prompts]
    else:
        ids = [tok.encode(p) for p in args.prompts]
    gen = Generator(loaded.model, loaded.params, page_size=args.page_size,
                    decode_steps=args.decode_steps)
    start = time.perf_counter()
    completions = gen.generate(ids, max_tokens=args.max_tokens, stop_ids=tok.stop_ids,
                               temperature=args.temperature, seed=args.seed)
    elapsed = time.perf_counter() - start
    for prompt, c in zip(args.prompts, completions):
        body = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids
        text = tok.decode(body, skip_special_tokens=True)
        if args.json:
            print(json.dumps({"prompt": prompt, "text": text, "token_ids": c.token_ids,
                              "finish_reason": c.finish_reason}, ensure_ascii=False))
        else:
            print(f"> {prompt}\n{text}\n[{len(c.token_ids)} tokens, finish: {c.finish_reason}]\n")
    total = sum(len(c.token_ids) for c in completions)
    print(f"jaxgen: {total} tokens in {elapsed:.1f}s (compilation included)", file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from jaxgen import checkpoints

    start = time.perf_counter()
    checkpoints.convert(args.src, args.dst, dtype=args.dtype)
    print(f"jaxgen: wrote {args.dst} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    from jaxgen.checkpoints import CheckpointError

    try:
        return {"generate": cmd_generate, "convert": cmd_convert}[args.command](args)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"jaxgen: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
