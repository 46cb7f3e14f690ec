"""`jaxgen` command line: `generate` and `convert` here; `serve` and `client` (the gRPC front
end) in jaxgen/server/cli.py, sharing the model and engine flags defined here.

User mistakes (bad flags, missing or broken checkpoints, unknown models) print one line naming
the problem and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="bundled model name (gemma3-270m, smollm2-135m) or a path to a .gguf file, "
                        "HF checkpoint dir or jaxgen checkpoint dir (default: gemma3-270m)")
    p.add_argument("--cache-dir", default=None,
                   help="where bundled models are converted on first use "
                        "(default: $JAXGEN_CACHE_DIR or ~/.cache/jaxgen)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="parameter and activation dtype")
    p.add_argument("--mesh", default=None,
                   help="device mesh as DATA,MODEL (e.g. 1,8); default: one device")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slots", type=int, default=8, help="decode batch rows (concurrent requests)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=None,
                   help="KV page pool size (default: from free device memory; 1024 on CPU)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + completion (default: min(model context, 4096))")
    p.add_argument("--decode-steps", type=int, default=8,
                   help="tokens generated per device call (on-device loop)")
    p.add_argument("--max-prefill-tokens", type=int, default=512,
                   help="prompt tokens prefilled per step (longer prompts are chunked)")
    p.add_argument("--warmup", action="store_true",
                   help="compile every shape before serving (always on for `serve`)")
    p.add_argument("--overlap-launch", action="store_true",
                   help="dispatch device steps from a launcher thread, overlapping the host's "
                        "per-step work (GPU: a step's kernels are launched by the dispatch)")
    p.add_argument("--compilation-cache-dir", default=None,
                   help="persistent XLA compilation cache (default: $JAXGEN_COMPILATION_CACHE_DIR "
                        "or ~/.cache/jaxgen/xla); 'off' disables it")


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The parser, and its `serve` subparser (whose defaults a --config preset replaces)."""
    from jaxgen.server import cli as server_cli

    parser = argparse.ArgumentParser(prog="jaxgen", description="JAX-native LLM generation")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete prompts with a model (continuous batching)")
    gen.add_argument("prompts", nargs="*", metavar="PROMPT")
    gen.add_argument("--prompts-file", default=None,
                     help="a file with one prompt per line (added after the PROMPT arguments)")
    add_model_args(gen)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT",
                     help="stop string (repeatable); never printed")
    gen.add_argument("--chat", action="store_true",
                     help="wrap each prompt as a user message in the model's chat template")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object per prompt (prompt, text, token_ids, finish_reason, usage)")
    add_engine_args(gen)

    conv = sub.add_parser("convert", help="write a model as a jaxgen (Orbax) checkpoint")
    conv.add_argument("src", help="bundled model name, .gguf file or HF checkpoint dir")
    conv.add_argument("dst", help="output directory")
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])

    serve = server_cli.add_serve_parser(sub)
    server_cli.add_client_parser(sub)
    server_cli.add_profile_parser(sub)
    return parser, serve


def load_model(args):
    """The checkpoint named by the model flags, on the --mesh; returns (LoadedModel, mesh or None)."""
    from jaxgen import checkpoints
    from jaxgen.models.sharding import make_mesh

    mesh = make_mesh(args.mesh) if args.mesh else None
    loaded = checkpoints.load(args.model or checkpoints.DEFAULT_MODEL, dtype=args.dtype,
                              mesh=mesh, cache=args.cache_dir)
    how = "converted on first use, then loaded" if loaded.converted else "loaded"
    print(f"jaxgen: {loaded.config.name or loaded.source} {how} from {loaded.source} "
          f"in {loaded.load_seconds:.1f}s", file=sys.stderr)
    return loaded, mesh


def build_engine(args, loaded, longest: int, mesh=None, **engine_config):
    """An Engine from the engine flags; `engine_config` overrides EngineConfig fields."""
    from jaxgen.engine import Engine, EngineConfig
    from jaxgen.runtime.compile_cache import enable_compilation_cache
    from jaxgen.runtime.runner import RunnerConfig

    if args.compilation_cache_dir != "off":
        enable_compilation_cache(args.compilation_cache_dir)
    context = loaded.config.max_position_embeddings
    max_len = args.max_model_len or min(context, max(4096, longest))
    runner = RunnerConfig(num_slots=args.slots, page_size=args.page_size, max_model_len=max_len,
                          decode_steps=args.decode_steps, num_pages=args.num_pages,
                          max_prefill_tokens=args.max_prefill_tokens)
    config = dict(warmup=args.warmup, overlap_launch=args.overlap_launch)
    config.update(engine_config)
    return Engine(loaded.model, loaded.params, loaded.tokenizer,
                  EngineConfig(runner=runner, **config), mesh=mesh)


def cmd_generate(args) -> int:
    from jaxgen.sampling_params import SamplingParams

    prompts = list(args.prompts)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give PROMPT arguments or --prompts-file")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
                            stop=tuple(args.stop))
    loaded, mesh = load_model(args)
    tok = loaded.tokenizer
    if args.chat:
        ids = [tok.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    else:
        ids = [tok.encode(p) for p in prompts]
    engine = build_engine(args, loaded, max(len(i) for i in ids) + args.max_tokens, mesh=mesh)
    start = time.perf_counter()
    engine.start()
    try:
        streams = [engine.add_request(i, params) for i in ids]
        total = sum(_print_stream(prompt, stream, args.json) for prompt, stream in zip(prompts, streams))
    finally:
        engine.stop()
    elapsed = time.perf_counter() - start
    print(f"jaxgen: {len(prompts)} prompts, {total} tokens in {elapsed:.1f}s (compilation included)",
          file=sys.stderr)
    return 0


def _print_stream(prompt: str, stream, as_json: bool) -> int:
    """Prints one request's completion (streamed as it arrives, unless JSON); returns its tokens."""
    if as_json:
        c = stream.result()
        usage = c.usage and {"prompt_tokens": c.usage.prompt_tokens,
                             "completion_tokens": c.usage.completion_tokens}
        print(json.dumps({"prompt": prompt, "text": c.text, "token_ids": list(c.token_ids),
                          "finish_reason": c.finish_reason, "usage": usage}, ensure_ascii=False))
        return len(c.token_ids)
    print(f"> {prompt}", flush=True)
    tokens, reason = 0, None
    for out in stream:
        print(out.text, end="", flush=True)
        tokens += len(out.token_ids)
        reason = out.finish_reason
    print(f"\n[{tokens} tokens, finish: {reason}]\n", flush=True)
    return tokens


def cmd_convert(args) -> int:
    from jaxgen import checkpoints

    start = time.perf_counter()
    checkpoints.convert(args.src, args.dst, dtype=args.dtype)
    print(f"jaxgen: wrote {args.dst} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from jaxgen.checkpoints import CheckpointError
    from jaxgen.server import cli as server_cli

    parser, serve = _parser()
    args = parser.parse_args(argv)
    commands = {"generate": cmd_generate, "convert": cmd_convert, "serve": server_cli.cmd_serve,
                "client": server_cli.cmd_client, "profile": server_cli.cmd_profile}
    try:
        if getattr(args, "config", None):  # a preset's values replace the flags' defaults
            serve.set_defaults(**server_cli.read_serve_preset(args.config, serve))
            args = parser.parse_args(argv)
        return commands[args.command](args)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"jaxgen: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
