"""`jaxgen serve` (the gRPC server on one model), `jaxgen client` (stream one completion from
a server to the terminal) and `jaxgen profile` (capture a profiler trace from a running server).

Parsing only imports the standard library; grpc is imported when one of these commands runs, so
`jaxgen generate` never loads it. Errors follow jaxgen/cli.py: a user mistake is one
`jaxgen: error: …` line and status 2; a call the server refused is one line and status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import threading

from jaxgen.server.config import (CLIENT_API_KEY_ENV, DEFAULT_HOST, DEFAULT_MAX_MESSAGE_BYTES,
                                  DEFAULT_PORT, DEFAULT_PROFILE_DIR, ServerConfig, read_api_keys,
                                  read_preset)


def add_serve_parser(sub) -> argparse.ArgumentParser:
    from jaxgen.cli import add_engine_args, add_model_args

    p = sub.add_parser("serve", help="serve a model over gRPC (jaxgen.v1.Generation)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a JSON preset of these flags (e.g. configs/serving/cpu-small.json); "
                        "flags given on the command line win")
    add_model_args(p)
    add_engine_args(p)
    p.add_argument("--max-waiting", type=int, default=1024,
                   help="waiting-queue bound; past it Generate answers RESOURCE_EXHAUSTED")
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0: any free port (printed)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept `authorization: Bearer KEY` (repeatable); with any key set, "
                        "calls without one are UNAUTHENTICATED (health stays open)")
    p.add_argument("--api-keys-file", default=None, metavar="FILE",
                   help="more API keys, one per line (also: $JAXGEN_API_KEYS, comma-separated)")
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="serve TLS with this certificate chain")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="... and this private key")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                   help="largest request or response message")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, how long in-flight requests may take to finish")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus /metrics over HTTP on --host:PORT (0: any free port, printed)")
    p.add_argument("--profiler-port", type=int, default=None, metavar="PORT",
                   help="start JAX's profiler server here (TensorBoard / XProf capture)")
    p.add_argument("--profile-dir", default=DEFAULT_PROFILE_DIR, metavar="DIR",
                   help="where traces captured by `jaxgen profile` are written on the server")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the engine in a process of its own (the default), so the gRPC front "
                        "end and the engine loop never wait on one GIL (as vLLM's engine core and "
                        "SGLang's scheduler run); --no-engine-process: on a thread of the server")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="jaxgen log level (INFO: a startup summary and one line per finished request)")
    p.add_argument("--log-prompts", action="store_true",
                   help="include prompt text in the per-request log lines (off: prompts stay private)")
    return p


def read_serve_preset(path: str, serve: argparse.ArgumentParser) -> dict:
    """The preset's values, checked against the `serve` flags' names and types."""
    def kind(action):
        if isinstance(action.default, (bool, list)):
            return type(action.default)
        return action.type or str
    return read_preset(path, {a.dest: kind(a) for a in serve._actions if a.dest != "help"})


def cmd_serve(args) -> int:
    from jaxgen.server.lifecycle import LOAD_THREAD, serve

    config = ServerConfig(host=args.host, port=args.port,
                          api_keys=read_api_keys(args.api_key, args.api_keys_file),
                          tls_cert=args.tls_cert, tls_key=args.tls_key,
                          max_message_bytes=args.max_message_bytes,
                          drain_timeout_s=args.drain_timeout, metrics_port=args.metrics_port,
                          profiler_port=args.profiler_port)
    if args.engine_process:  # the engine process starts the profiler server (its device work)
        config = dataclasses.replace(config, profiler_port=None)
    for path in (config.tls_cert, config.tls_key):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
    if args.max_waiting < 1:
        raise ValueError(f"max_waiting={args.max_waiting}: must be >= 1")
    logging.getLogger("jaxgen").setLevel(args.log_level)
    asyncio.run(_serve_until_signalled(serve, config, lambda: _load_serving_model(args)))
    if any(t.name == LOAD_THREAD and t.is_alive() for t in threading.enumerate()):
        # Stopped during warm-up. The loading thread is inside XLA, which cannot be interrupted
        # and aborts if the interpreter is torn down under it; nothing else is left to clean up.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


async def _serve_until_signalled(serve, config, load) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(config, load, stop)


def _load_serving_model(args):
    """Runs on the loading thread: checkpoint, engine (warm-up compiles every shape), loop; in
    its own process (the default: started here, ready when this returns), or with
    --no-engine-process in this one."""
    import jax

    from jaxgen.request_log import RequestLog
    from jaxgen.server.serving_model import ServingModel

    if args.engine_process:
        from jaxgen.server.engine_process import EngineClient

        engine = EngineClient(args)
        info = engine.info
        model = ServingModel(engine, info.name, info.mesh, info.device, engine.capture_profile)
        jax_version, where = info.jax_version, f"process pid={engine.pid}"
    else:
        import functools

        from jaxgen.cli import build_engine, load_model
        from jaxgen.profiling import ProfileCapture

        loaded, mesh = load_model(args)
        engine = build_engine(args, loaded, 0, mesh=mesh, warmup=True, max_waiting=args.max_waiting)
        engine.start()
        axes = tuple(mesh.shape.items()) if mesh is not None else (("data", 1), ("model", 1))
        devices = mesh.devices.size if mesh is not None else 1
        name = loaded.config.name or os.path.basename(loaded.source.rstrip("/"))
        capture = functools.partial(ProfileCapture(args.profile_dir).capture,
                                    quiesce=engine.quiesced)
        model = ServingModel(engine, name, axes, f"{jax.devices()[0].platform} x{devices}", capture)
        jax_version, where = jax.__version__, "thread"
    engine.observers.append(RequestLog(engine.tokenizer, log_prompts=args.log_prompts))
    sched = engine.scheduler.config
    logging.getLogger("jaxgen.server").info(
        "startup model=%s device=%r mesh=%s dtype=%s slots=%d pages=%d page_size=%d "
        "max_model_len=%d decode_steps=%d max_prefill_tokens=%d compile_s=%.2f engine=%s jax=%s",
        model.name, model.device, ",".join(f"{a}:{n}" for a, n in model.mesh),
        model.model_config.dtype, sched.num_slots, engine.runner.num_pages, sched.page_size,
        sched.max_model_len, sched.decode_steps, sched.max_prefill_tokens,
        engine.warmup_seconds or 0.0, where, jax_version)
    return model


# -- client ------------------------------------------------------------------------------------

def add_client_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("client", help="stream a completion from a `jaxgen serve` server")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--chat", action="store_true",
                   help="send PROMPT as a user message (rendered with the model's chat template)")
    p.add_argument("--system", default=None, help="with --chat: a system message first")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--logprobs", type=int, default=None, help="with --json: top-N logprobs per token")
    p.add_argument("--priority", type=int, default=0, help="lower is admitted first")
    p.add_argument("--request-id", default="")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="the call's deadline")
    p.add_argument("--api-key", default=None,
                   help=f"sent as `authorization: Bearer KEY` (default: ${CLIENT_API_KEY_ENV})")
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
    api_key = args.api_key or os.environ.get(CLIENT_API_KEY_ENV)
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

def add_profile_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("profile", help="capture a profiler trace from a running `jaxgen serve`")
    p.add_argument("--server", default=f"{DEFAULT_HOST}:{DEFAULT_PORT}", metavar="HOST:PORT")
    p.add_argument("--duration", type=float, default=5.0, metavar="SECONDS",
                   help="how long to trace (the server traces everything it does meanwhile)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="local directory for the trace files (open with TensorBoard / XProf, or "
                        "the perfetto_trace.json.gz in https://ui.perfetto.dev)")
    p.add_argument("--api-key", default=None,
                   help=f"sent as `authorization: Bearer KEY` (default: ${CLIENT_API_KEY_ENV})")
    p.add_argument("--tls-ca", default=None, metavar="PEM")
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
    metadata = client.auth_metadata(args.api_key or os.environ.get(CLIENT_API_KEY_ENV))
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
