"""uvicorn serving the HTTP app (jaxgen.server.http_app) on the front-end process's own event
loop, beside grpc.aio: one loop, one process, one engine surface.

The port is bound here first (so a busy port is one clear error and port 0 is resolved before
anything is printed); signals stay with `jaxgen serve`, whose drain stops this server after the
in-flight requests are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import uvicorn

STOP_TIMEOUT_S = 5.0  # after the drain, for uvicorn to close its connections
# The kernel's send buffer of each connection (set on the listening socket; accepted ones inherit
# it). Left to autotuning it grows to megabytes, which a client that stopped reading pins, and
# while it has room no write waits, so the stream guard cannot tell that nobody reads. Token
# events are small: this still holds seconds of any stream.
SEND_BUFFER_BYTES = 64 * 1024


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn would install SIGINT / SIGTERM handlers of its own (signal.signal), replacing
        # the server's drain; jaxgen serve handles them.
        yield


class HttpServer:
    def __init__(self, app, host: str, port: int, tls_cert: str | None = None,
                 tls_key: str | None = None):
        self._config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False,
                                      ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                                      timeout_graceful_shutdown=STOP_TIMEOUT_S)
        self._server = _Server(self._config)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        try:
            self._socket.bind((host, port))
        except OSError as e:
            self._socket.close()
            raise ValueError(f"http_port={port}: cannot listen on {host}:{port}: "
                             f"{e.strerror or e}") from None
        self.port = self._socket.getsockname()[1]
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._server.serve(sockets=[self._socket]))
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()  # raises why it could not start

    async def stop(self) -> None:
        if self._task is None:
            self._socket.close()
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), STOP_TIMEOUT_S + 1)
        except TimeoutError:
            self._server.force_exit = True
            await asyncio.wait_for(self._task, 2)
