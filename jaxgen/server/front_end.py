"""What the gRPC servicer and the HTTP app share in the front-end process: the serving model once
warm-up is done, the drain flag, the count of generation calls in progress (the drain waits for
it to reach zero), a small pool that runs tokenization off the event loop, the metrics registry
both expose, the limits on streams whose client stops reading, and the prefix-cache salt of a
call. One per server; everything here runs on the server's event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses

from jaxgen.sampling_params import cache_salt
from jaxgen.server.serving_model import ServingModel


@dataclasses.dataclass(frozen=True)
class StreamLimits:
    """A stream whose client reads nothing is ended (and its request aborted) after
    `stall_timeout_s` with output waiting, or once `buffer_tokens` tokens wait unsent."""

    stall_timeout_s: float = 60.0
    buffer_tokens: int = 8192


class NotReady(Exception):
    """The server cannot take this call now: warming up, draining, or the engine failed."""


class FrontEnd:
    def __init__(self, cache_scope: str = "global", stream_limits: StreamLimits = StreamLimits()):
        self.cache_scope = cache_scope  # ServerConfig.cache_scope
        self.stream_limits = stream_limits
        self.model: ServingModel | None = None  # set once warm-up is done
        self.metrics = None  # jaxgen.metrics.ServingMetrics, created with the model
        self.draining = False
        self._calls = 0  # generation calls in progress (gRPC streams, HTTP requests)
        self._idle = asyncio.Event()
        self._idle.set()
        self._pool = concurrent.futures.ThreadPoolExecutor(2, "jaxgen-tokenize")

    def ready(self, generating: bool = False) -> ServingModel:
        """The model, or NotReady saying why not (generating: also refused while the engine
        restarts and while draining)."""
        m = self.model
        if m is None:
            raise NotReady("the model is warming up; retry shortly")
        if m.engine.dead is not None:
            raise NotReady(f"the engine has failed: {m.engine.dead}")
        if generating and m.engine.restarting is not None:
            raise NotReady(f"the engine is restarting after a failure ({m.engine.restarting}); "
                           f"retry shortly")
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

    def salt(self, api_key: str | None, given: str) -> str:
        """The prefix-cache salt of a call (`cache_salt` within this server's scope)."""
        return cache_salt(self.cache_scope, api_key, given)

    def salted(self, params: list, api_key: str | None, given: str) -> list:
        """`params` (one SamplingParams per choice of a call) with the call's cache salt."""
        salt = self.salt(api_key, given)
        return [dataclasses.replace(p, cache_salt=salt) for p in params] if salt else params

    async def off_loop(self, fn):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
