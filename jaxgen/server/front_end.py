"""What the gRPC servicer and the HTTP app share in the front-end process: the serving model once
warm-up is done, the drain flag, the count of generation calls in progress (the drain waits for
it to reach zero), a small pool that runs tokenization off the event loop, and the metrics
registry both expose. One per server; everything here runs on the server's event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib

from jaxgen.server.serving_model import ServingModel


class NotReady(Exception):
    """The server cannot take this call now: warming up, draining, or the engine failed."""


class FrontEnd:
    def __init__(self):
        self.model: ServingModel | None = None  # set once warm-up is done
        self.metrics = None  # jaxgen.metrics.ServingMetrics, created with the model
        self.draining = False
        self._calls = 0  # generation calls in progress (gRPC streams, HTTP requests)
        self._idle = asyncio.Event()
        self._idle.set()
        self._pool = concurrent.futures.ThreadPoolExecutor(2, "jaxgen-tokenize")

    def ready(self, generating: bool = False) -> ServingModel:
        """The model, or NotReady saying why not (generating: also refused while draining)."""
        m = self.model
        if m is None:
            raise NotReady("the model is warming up; retry shortly")
        if m.engine.dead is not None:
            raise NotReady(f"the engine has failed: {m.engine.dead}")
        if generating and self.draining:
            raise NotReady("the server is draining (shutting down)")
        return m

    @property
    def active_calls(self) -> int:
        return self._calls

    @contextlib.contextmanager
    def call(self):
        """Counts a generation call in progress for the drain."""
        self._calls += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._calls -= 1
            if self._calls == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Returns once no generation call is in progress."""
        await self._idle.wait()

    async def off_loop(self, fn):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
