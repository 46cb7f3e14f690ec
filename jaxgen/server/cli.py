"""`jaxgen serve` (the gRPC server on one model), `jaxgen client` (stream one completion from
a server to the terminal) and `jaxgen profile` (capture a profiler trace from a running server).

Parsing only imports the standard library; grpc is imported when one of these commands runs, so
`jaxgen generate` never loads it. Errors follow jaxgen/cli.py: a user mistake is one
`jaxgen: error: …` line and status 2; a call the server refused is one line and status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading

from jaxgen import config_sources
from jaxgen.config import DEFAULT_HOST, DEFAULT_PORT, Config
from jaxgen.config_sources import API_KEY_ENV


def add_serve_parser(sub, formatter_class=argparse.HelpFormatter) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve a model over gRPC (jaxgen.v1.Generation)",
                       formatter_class=formatter_class)
    config_sources.add_settings(p, "serve")
    return p


def cmd_serve(args) -> int:
    from jaxgen.engine_api import EngineDeadError, GroupLostError
    from jaxgen.server.lifecycle import LOAD_THREAD, serve

    config = config_sources.config_from_args(args, "serve")
    logging.getLogger("jaxgen").setLevel(config.server.log_level)
    if config.distributed.enabled:
        from jaxgen.build import is_worker, run_worker

        if is_worker(config):  # process 0 alone listens; this one runs its plans
            return run_worker(config)
    try:
        asyncio.run(_serve_until_signalled(serve, config.server,
                                           lambda: _load_serving_model(config)))
    except GroupLostError as e:  # NOT_SERVING was shown, the streams ended UNAVAILABLE
        print(f"jaxgen: error: {e}", file=sys.stderr, flush=True)
        return e.exit_status
    except EngineDeadError as e:  # drained; exit non-zero so that an orchestrator replaces us
        print(f"jaxgen: error: the engine has failed: {e}", file=sys.stderr, flush=True)
        # A hung engine's thread may be stuck in a device call, which the interpreter's
        # teardown would wait for or abort in; nothing is left to save.
        sys.stdout.flush()
        os._exit(1)
    if any(t.name == LOAD_THREAD and t.is_alive() for t in threading.enumerate()):
        # Stopped during warm-up. The loading thread is inside XLA, which cannot be interrupted
        # and aborts if the interpreter is torn down under it; nothing else is left to clean up.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


async def _serve_until_signalled(serve, server_config, load) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(server_config, load, stop)


def _load_serving_model(config: Config):
    """Runs on the loading thread: the engine (checkpoint, warm-up, loop) in its own process
    (the default: started here, ready when this returns), or with --no-engine-process on a
    thread of this one; both from `build_engine(config)`."""
    from jaxgen.request_log import RequestLog
    from jaxgen.server.serving_model import ServingModel

    if config.server.engine_process:
        from jaxgen.server.engine_client import EngineClient

        engine = EngineClient(config)
        where = f"process pid={engine.pid}"
    else:
        from jaxgen.build import build_engine

        engine = build_engine(config)
        engine.start()
        where = "thread"
    engine.observers.append(RequestLog(engine.tokenizer, log_prompts=config.server.log_prompts))
    info = engine.info()
    logging.getLogger("jaxgen.server").info(
        "startup model=%s device=%r mesh=%s dtype=%s slots=%d pages=%d page_size=%d "
        "max_model_len=%d decode_steps=%d max_prefill_tokens=%d compile_s=%.2f engine=%s jax=%s",
        info.name, info.device, ",".join(f"{a}:{n}" for a, n in info.mesh), info.dtype,
        info.num_slots, info.num_pages, info.page_size, info.max_model_len, info.decode_steps,
        info.max_prefill_tokens, info.warmup_seconds or 0.0, where, info.jax_version)
    return ServingModel(engine)


def client_api_key(environ=os.environ) -> str | None:
    """The key a client sends by default: the first of $JAXGEN_API_KEY (which may list several,
    as the server reads it)."""
    keys = [k.strip() for k in environ.get(API_KEY_ENV, "").split(",") if k.strip()]
    return keys[0] if keys else None


# -- client ------------------------------------------------------------------------------------

def add_client_parser(sub, formatter_class=argparse.HelpFormatter) -> argparse.ArgumentParser:
    p = sub.add_parser("client", help="stream a completion from a `jaxgen serve` server",
                       formatter_class=formatter_class)
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--host", default=DEFAULT_HOST, help="the server's address")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="the server's gRPC port")
    p.add_argument("--chat", action="store_true",
                   help="send PROMPT as a user message (rendered with the model's chat template)")
    p.add_argument("--system", default=None, help="with --chat: a system message first")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="unset: the server's default (off)")
    p.add_argument("--top-p", type=float, default=None, help="unset: the server's default (off)")
    p.add_argument("--min-p", type=float, default=None, help="unset: the server's default (off)")
    p.add_argument("--seed", type=int, default=None, help="unset: the server picks one")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--logprobs", type=int, default=None, help="with --json: top-N logprobs per token")
    p.add_argument("--priority", type=int, default=0, help="lower is admitted first")
    p.add_argument("--request-id", default="", help="empty: the server makes one")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="the call's deadline")
    p.add_argument("--api-key", default=None,
                   help=f"sent as `authorization: Bearer KEY`; unset: the first key of ${API_KEY_ENV}")
    p.add_argument("--tls-ca", default=None, metavar="PEM",
                   help="connect with TLS, trusting this CA (or self-signed) certificate")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object at the end (text, token_ids, finish_reason, usage)")
    return p


def cmd_client(args) -> int:
    import grpc

    from jaxgen.server import client

    if args.system is not None and not args.chat:
        raise ValueError("--system needs --chat")
    request = client.generate_request(
        args.prompt, chat=args.chat, system=args.system, request_id=args.request_id,
        priority=args.priority, max_tokens=args.max_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop=args.stop,
        logprobs=args.logprobs)
    tls_ca = None
    if args.tls_ca is not None:
        with open(args.tls_ca, "rb") as f:
            tls_ca = f.read()
    api_key = args.api_key or client_api_key()
    try:
        with client.connect(args.host, args.port, tls_ca) as channel:
            responses = client.generate(channel, request, api_key=api_key, timeout=args.timeout)
            result = client.collect(responses, echo=None if args.json else sys.stdout)
    except grpc.RpcError as e:
        print(f"\njaxgen: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # leaving the `with` closed the channel: the call is cancelled
        print("\njaxgen: cancelled", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(file=sys.stdout, flush=True)
        print(f"[{result['usage'].get('completion_tokens', 0)} tokens, finish: "
              f"{result['finish_reason']}]", file=sys.stderr)
    return 0


# -- profile -----------------------------------------------------------------------------------

def add_profile_parser(sub, formatter_class=argparse.HelpFormatter) -> argparse.ArgumentParser:
    p = sub.add_parser("profile", help="capture a profiler trace from a running `jaxgen serve`",
                       formatter_class=formatter_class)
    p.add_argument("--server", default=f"{DEFAULT_HOST}:{DEFAULT_PORT}", metavar="HOST:PORT",
                   help="the server's gRPC address")
    p.add_argument("--duration", type=float, default=5.0, metavar="SECONDS",
                   help="how long to trace (the server traces everything it does meanwhile)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="local directory for the trace files (open with TensorBoard / XProf, or "
                        "the perfetto_trace.json.gz in https://ui.perfetto.dev)")
    p.add_argument("--api-key", default=None,
                   help=f"sent as `authorization: Bearer KEY`; unset: the first key of ${API_KEY_ENV}")
    p.add_argument("--tls-ca", default=None, metavar="PEM",
                   help="connect with TLS, trusting this CA (or self-signed) certificate")
    return p


def cmd_profile(args) -> int:
    import grpc

    from jaxgen.server import client
    from jaxgen.v1 import generation_pb2 as pb
    from jaxgen.v1 import generation_pb2_grpc as pb_grpc

    host, sep, port = args.server.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"server={args.server!r}: expected HOST:PORT")
    if not args.duration > 0:
        raise ValueError(f"duration={args.duration}: must be > 0")
    tls_ca = None
    if args.tls_ca is not None:
        with open(args.tls_ca, "rb") as f:
            tls_ca = f.read()
    metadata = client.auth_metadata(args.api_key or client_api_key())
    written, server_dir = [], None
    try:
        with client.connect(host.strip("[]"), int(port), tls_ca) as channel:
            chunks = pb_grpc.GenerationStub(channel).CaptureProfile(
                pb.CaptureProfileRequest(duration_s=args.duration), metadata=metadata,
                timeout=args.duration + 120)
            for chunk in chunks:
                server_dir = chunk.server_dir
                rel = os.path.normpath(chunk.path)
                if rel.startswith("..") or os.path.isabs(rel):
                    raise ValueError(f"server sent an unsafe path {chunk.path!r}")
                path = os.path.join(args.out, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "r+b" if chunk.offset else "wb") as f:
                    f.seek(chunk.offset)
                    f.write(chunk.data)
                if chunk.last:
                    written.append(path)
    except grpc.RpcError as e:
        print(f"jaxgen: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(f"jaxgen: {len(written)} trace file(s) in {args.out} (server copy: {server_dir})",
          file=sys.stderr)
    for path in written:
        print(path)
    return 0
