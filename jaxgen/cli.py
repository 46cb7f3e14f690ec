"""`jaxgen` command line: `generate` and `convert` here; `serve`, `client` and `profile` (the
front end) in jaxgen/server/cli.py. The model and engine settings of `generate` and `serve` are
declared once, in jaxgen/config_sources.py, and become one `Config` for `build_engine`.

User mistakes (bad flags or settings, missing or broken checkpoints, unknown models) print one
line naming the problem and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from jaxgen import config_sources
from jaxgen.config import GroupError
from jaxgen.planning.cli import add_plan_parser, cmd_plan
from jaxgen.server import cli as server_cli
from jaxgen.version import version

HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxgen", description="JAX-native LLM generation serving",
                                formatter_class=HELP_FORMAT)
    p.add_argument("--version", action="version", version=f"jaxgen {version()}")
    sub = p.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete prompts with a model (continuous batching)",
                         formatter_class=HELP_FORMAT)
    gen.add_argument("prompts", nargs="*", metavar="PROMPT")
    gen.add_argument("--prompts-file", default=None,
                     help="a file with one prompt per line (added after the PROMPT arguments)")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt at most")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="0 = greedy (a terminal command is reproducible by default; the API's "
                          "default is 1.0)")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 = off")
    gen.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    gen.add_argument("--seed", type=int, default=0, help="random stream of each prompt (sampled output)")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT",
                     help="stop string (repeatable); never printed")
    gen.add_argument("--chat", action="store_true",
                     help="wrap each prompt as a user message in the model's chat template")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object per prompt (prompt, text, token_ids, finish_reason, usage)")
    config_sources.add_settings(gen, "generate")

    conv = sub.add_parser("convert", help="write a model as a jaxgen (Orbax) checkpoint",
                          formatter_class=HELP_FORMAT)
    conv.add_argument("src", help="bundled model name, .gguf file or HF checkpoint dir")
    conv.add_argument("dst", help="output directory")
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="dtype of the written weights")

    batch = sub.add_parser("batch", help="run an OpenAI Batch file (JSONL) through the engine; "
                           "resumable", formatter_class=HELP_FORMAT)
    batch.add_argument("input", metavar="INPUT", help="OpenAI Batch JSONL (- for stdin)")
    batch.add_argument("output", metavar="OUTPUT",
                       help="one record per input line, appended (- for stdout); running the same "
                            "command again skips the custom_ids already in it")
    batch.add_argument("--order", default="completion", choices=["completion", "input"],
                       help="completion: records as lines finish; input: in input order (holds "
                            "at most --window early finishers in memory)")
    batch.add_argument("--window", type=int, default=None,
                       help="lines in the engine at once, at most --max-waiting + --slots "
                            "(None: 2 x --slots)")
    batch.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="on SIGINT / SIGTERM, how long lines in flight may take to finish")
    batch.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    batch.add_argument("--summary-json", default=None, metavar="FILE",
                       help="also write the summary as JSON here")
    config_sources.add_settings(batch, "batch")

    server_cli.add_serve_parser(sub, HELP_FORMAT)
    add_plan_parser(sub, HELP_FORMAT)
    server_cli.add_client_parser(sub, HELP_FORMAT)
    server_cli.add_profile_parser(sub, HELP_FORMAT)
    return p


def cmd_generate(args) -> int:
    from jaxgen.build import build_engine, is_worker, load_model, run_worker, start_leader
    from jaxgen.sampling_params import SamplingParams

    config = config_sources.config_from_args(args, "generate")
    if is_worker(config):  # process 0 prints; this one runs its plans
        return run_worker(config)
    prompts = list(args.prompts)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give PROMPT arguments or --prompts-file")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
                            stop=tuple(args.stop))
    leader = start_leader(config)
    loaded, mesh = load_model(config, leader.group if leader else None)
    tok = loaded.tokenizer
    if args.chat:
        ids = [tok.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    else:
        ids = [tok.encode(p) for p in prompts]
    engine = build_engine(config, longest=max(len(i) for i in ids) + args.max_tokens,
                          loaded=loaded, mesh=mesh, leader=leader)
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


def cmd_batch(args) -> int:
    from jaxgen import batch
    from jaxgen.build import is_worker, run_worker

    config = config_sources.config_from_args(args, "batch")
    if is_worker(config):  # process 0 reads and writes the files; this one runs its plans
        return run_worker(config)
    options = batch.BatchOptions(order=args.order, drain_timeout_s=args.drain_timeout,
                                 window=args.window, quiet=args.quiet,
                                 summary_json=args.summary_json)
    try:
        s = batch.run(args.input, args.output, config, options)
    except batch.JobError as e:
        print(f"jaxgen: error: {e}", file=sys.stderr)
        return e.status
    if not args.quiet:
        print(f"jaxgen batch: {s.ok} ok, {s.failed} failed, {s.skipped} skipped (done before), "
              f"{s.left} left of {s.lines} lines; {s.prompt_tokens} prompt tokens ({s.cached_tokens} "
              f"cached), {s.output_tokens} output tokens in {s.wall_s:.1f}s = "
              f"{s.output_tok_s:,.1f} tok/s; prefix-cache hit rate "
              f"{s.prefix_cache_hit_rate:.0%}", file=sys.stderr)
    if not s.complete:
        print(f"jaxgen batch: interrupted with {s.left} line(s) left: run the same command "
              f"again to resume", file=sys.stderr)
        return 1
    return 0


def cmd_convert(args) -> int:
    from jaxgen import checkpoints

    start = time.perf_counter()
    checkpoints.convert(args.src, args.dst, dtype=args.dtype)
    print(f"jaxgen: wrote {args.dst} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


COMMANDS = {"generate": cmd_generate, "batch": cmd_batch, "convert": cmd_convert,
            "serve": server_cli.cmd_serve, "client": server_cli.cmd_client,
            "profile": server_cli.cmd_profile, "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except GroupError as e:  # a process of a group that could not start
        print(f"jaxgen: error: {e}", file=sys.stderr)
        _leave_now(2)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError and ConfigError included
        print(f"jaxgen: error: {e}", file=sys.stderr)
        return 2


def _leave_now(status: int):
    """Exits without the interpreter's exit handlers: jax.distributed's would wait in a
    shutdown barrier for processes that are leaving on errors of their own."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
