"""Running the gRPC server: listen, warm up, serve, drain.

`serve(config, load, stop)`:
  1. binds the port (TLS when configured) and starts answering at once, with health NOT_SERVING
     and every Generation RPC UNAVAILABLE;
  2. runs `load()` (checkpoint load, engine construction with warm-up, `engine.start()`) on a
     daemon thread, so a SIGTERM during warm-up still stops the process promptly;
  3. starts `/metrics` (with `metrics_port`), sets health SERVING; a watcher follows the
     engine: NOT_SERVING while it restarts (engine process) and SERVING again after; once it is
     dead for good (on a thread: failed or hung; in its own process: past the restart limit) it
     sets `stop`, and `serve` raises EngineDeadError after the drain (`jaxgen serve` exits 1),
     so that an orchestrator replaces the server;
  4. when `stop` is set (SIGTERM/SIGINT in `jaxgen serve`): health NOT_SERVING, new Generate
     calls UNAVAILABLE, in-flight calls get `drain_timeout_s` to finish, then the server stops
     (cancelling what is left) and the engine loop ends (over several processes: all of them).
     An engine that lost one of its processes stops the server the same way, by itself.
JAX's profiler server starts with the gRPC port when `profiler_port` is set.
Health answers for "" (the whole server) and for "jaxgen.v1.Generation". Reflection lists the
Generation, health and reflection services.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable

import grpc
import jax
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxgen.config import ServerConfig
from jaxgen.engine_api import EngineDeadError, GroupLostError
from jaxgen.server.auth import ApiKeyInterceptor
from jaxgen.server.front_end import FrontEnd, StreamLimits
from jaxgen.server.servicer import GenerationServicer
from jaxgen.server.serving_model import ServingModel
from jaxgen.v1 import generation_pb2 as pb
from jaxgen.v1 import generation_pb2_grpc as pb_grpc
from jaxgen.version import version

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
HEALTH_NAMES = ("", SERVICE)
ENGINE_WATCH_INTERVAL_S = 0.25
LOAD_THREAD = "jaxgen-load"  # the thread that loads the model and warms up
LOST_GRACE_S = 2.0  # NOT_SERVING shown this long before a server whose engine group was lost exits
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _say(message: str) -> None:
    print(f"jaxgen: {message}", file=sys.stderr, flush=True)


def _in_daemon_thread(fn: Callable):
    """Runs `fn()` on a daemon thread; an awaitable of its result. (A pool thread would keep
    the process alive at exit until `fn` returns.)"""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(setter, value):
        if not future.done():
            setter(value)

    def run():
        try:
            result = fn()
        except BaseException as e:  # handed to the awaiting coroutine
            call, value = future.set_exception, e
        else:
            call, value = future.set_result, result
        try:
            loop.call_soon_threadsafe(settle, call, value)
        except RuntimeError:  # the loop has closed: nobody waits any more
            pass

    threading.Thread(target=run, name=LOAD_THREAD, daemon=True).start()
    return future


def build_server(config: ServerConfig, servicer: GenerationServicer,
                 health_servicer: health.aio.HealthServicer) -> tuple[aio.Server, int]:
    """The grpc.aio server with every service added and its port bound; returns it and the port."""
    limit = config.max_message_bytes
    server = aio.server(
        interceptors=[ApiKeyInterceptor(config.api_keys)] if config.api_keys else [],
        options=[("grpc.max_receive_message_length", limit),
                 ("grpc.max_send_message_length", limit),
                 # Otherwise a second server on a busy port binds it too and shares the traffic.
                 ("grpc.so_reuseport", 0)])
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    _check_free(config)
    try:
        if config.tls_cert:
            with open(config.tls_key, "rb") as k, open(config.tls_cert, "rb") as c:
                credentials = grpc.ssl_server_credentials([(k.read(), c.read())])
            port = server.add_secure_port(config.address, credentials)
        else:
            port = server.add_insecure_port(config.address)
    except RuntimeError as e:  # grpc's "Failed to bind": a busy port or a bad host
        raise ValueError(f"cannot listen on {config.address}: {e}") from None
    return server, port


def _check_free(config: ServerConfig) -> None:
    """A clear error for a busy port or an unusable host, before grpc (which would log its own
    lines) tries to bind."""
    if config.port == 0:
        return
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((config.host, config.port))
        except OSError as e:
            raise ValueError(f"cannot listen on {config.address}: {e.strerror or e}") from None


async def _set_health(health_servicer, status) -> None:
    for name in HEALTH_NAMES:
        await health_servicer.set(name, status)


async def _watch_engine(model: ServingModel, health_servicer, stop: asyncio.Event) -> None:
    """Health follows the engine: NOT_SERVING while it restarts, SERVING again once it serves;
    once it is dead for good, NOT_SERVING and `stop` set (drain, then `serve` raises).
    A multi-process engine that lost a process is not coming back either: health checkers see
    NOT_SERVING for LOST_GRACE_S first."""
    engine, serving = model.engine, True
    while True:
        if engine.dead is not None:
            log.error("engine failed, health is now NOT_SERVING: %r", engine.dead)
            _say(f"error: the engine has failed ({engine.dead}); health is NOT_SERVING; "
                 f"draining, then exiting")
            await _set_health(health_servicer, NOT_SERVING)
            if isinstance(engine.dead, GroupLostError):
                await asyncio.sleep(LOST_GRACE_S)
            stop.set()
            return
        up = engine.restarting is None
        if up != serving:
            serving = up
            await _set_health(health_servicer, SERVING if up else NOT_SERVING)
            _say("the engine serves again; health is SERVING" if up else
                 f"the engine failed ({engine.restarting}); restarting it, health is NOT_SERVING")
        await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)


async def serve(config: ServerConfig, load: Callable[[], ServingModel], stop: asyncio.Event,
                on_listening: Callable[[int], None] | None = None) -> None:
    """Serves until `stop` is set, then drains (see the module docstring). Errors from `load`
    propagate after the server has stopped, and EngineDeadError when the engine died for good."""
    front = FrontEnd(config.cache_scope, StreamLimits(config.stream_stall_timeout_s,
                                                      config.stream_buffer_tokens))
    servicer = GenerationServicer(front)
    if config.profiler_port is not None and not config.engine_process:  # else the engine process's
        jax.profiler.start_server(config.profiler_port)  # the port is checked by ServerConfig
        _say(f"profiler server on port {config.profiler_port}")
    health_servicer = health.aio.HealthServicer()
    await _set_health(health_servicer, NOT_SERVING)
    server, port = build_server(config, servicer, health_servicer)
    http = _http_server(config, front) if config.http else None
    await server.start()
    scheme = "TLS" if config.tls_cert else "plaintext"
    keys = ", API keys required" if config.api_keys else ""
    if http is not None:
        await http.start()
        _say(f"HTTP (OpenAI API) on {'https' if config.tls_cert else 'http'}://"
             f"{config.http_address}:{http.port}/v1")
    _say(f"listening on {config.host}:{port} ({scheme}{keys}); warming up")
    if on_listening is not None:
        on_listening(port)
    model, watcher = None, None
    try:
        loading = _in_daemon_thread(load)
        loading.add_done_callback(lambda f: f.cancelled() or f.exception())  # seen either way
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([loading, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            model = loading.result()
            if config.metrics_port is not None or config.http:
                _start_metrics(config, front, model)
            front.model = model
            await _set_health(health_servicer, SERVING)
            watcher = asyncio.ensure_future(_watch_engine(model, health_servicer, stop))
            _say(f"serving {model.name} on {config.host}:{port}")
            await stopping
        stopping.cancel()
        await _drain(config, server, http, front, health_servicer)
    finally:
        if watcher is not None:
            watcher.cancel()
        await server.stop(0)
        if http is not None:
            await http.stop()
        front.close()
        if model is not None:
            model.engine.stop()
    dead = model.engine.dead if model is not None else None
    if isinstance(dead, EngineDeadError):  # GroupLostError: `serve` exits with its status
        raise dead
    if dead is not None:  # the engine's loop failed
        raise EngineDeadError(f"{type(dead).__name__}: {dead}") from dead


def _http_server(config: ServerConfig, front: FrontEnd):
    from jaxgen.server.http_app import build_app
    from jaxgen.server.http_server import HttpServer

    app = build_app(front, config.api_keys, version())
    return HttpServer(app, config.http_address, config.http_port, config.tls_cert, config.tls_key)


def _start_metrics(config: ServerConfig, front: FrontEnd, model: ServingModel) -> None:
    """One registry for the engine, exposed at the HTTP API's /metrics and, with metrics_port,
    on a port of its own. (prometheus is imported only then.)"""
    from jaxgen.metrics import ServingMetrics

    front.metrics = ServingMetrics(model.engine)
    if config.metrics_port is not None:
        port = front.metrics.serve(config.host, config.metrics_port)
        _say(f"metrics on http://{config.host}:{port}/metrics")


async def _drain(config, server, http, front: FrontEnd, health_servicer) -> None:
    front.draining = True
    await health_servicer.enter_graceful_shutdown()
    start = time.monotonic()
    if front.active_calls:
        _say(f"draining {front.active_calls} in-flight request(s) "
             f"(up to {config.drain_timeout_s:g}s)")
    try:
        await asyncio.wait_for(front.wait_idle(), config.drain_timeout_s)
    except TimeoutError:
        _say(f"drain timeout: cancelling {front.active_calls} request(s)")
    # New RPCs are refused from here; unary calls still running get what is left of the grace.
    await server.stop(max(0.0, config.drain_timeout_s - (time.monotonic() - start)))
    if http is not None:
        await http.stop()
    _say("stopped")
