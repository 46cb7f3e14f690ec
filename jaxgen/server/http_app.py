"""The OpenAI-compatible HTTP API (FastAPI), served by uvicorn on the front-end process's event
loop beside the gRPC server, over the same engine surface and the same `FrontEnd` (model, drain,
calls in progress). Requests and responses are OpenAI's (jaxgen.openai_api); this module only
moves them over HTTP: JSON bodies in, JSON or server-sent events out, errors as OpenAI's error
object with the status codes a client of OpenAI or vLLM expects:

  400 a bad field (the message names field, value and limit)   401 no valid API key
  404 an unknown model name                                    429 the waiting queue is full, or
  500 the engine failed that request                               the request was shed from it
  503 warming up, draining, the engine restarting or failed, or lost under the request (retry)

A stream that fails after its first event ends with OpenAI's error object as an event (the
same statuses as its `code`). A client that disconnects, or stops reading a stream, aborts its
requests: slots and pages are freed at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from jaxgen.engine_api import EngineDeadError, QueueFullError, RequestError, add_choices
from jaxgen.openai_api import schemas
from jaxgen.openai_api.requests import (ENDPOINTS, Generation, OpenAIError, chat_messages,
                                        check_model, parse)
from jaxgen.openai_api.responses import Responder
from jaxgen.server.auth import bearer_key, key_matches
from jaxgen.server.front_end import FrontEnd, NotReady
from jaxgen.server.stream_bridge import merged_outputs
from jaxgen.server.stream_guard import StreamGuard, StreamStalled

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
OPEN_PATHS = ("/health", "/version")  # answered without an API key


def _error(e: OpenAIError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status in (429, 503) else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def build_app(front: FrontEnd, api_keys=(), version: str = "unknown") -> FastAPI:
    app = FastAPI(title="jaxgen", version=version, docs_url=None, redoc_url=None)
    keys = [k.encode() for k in api_keys]

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if keys and request.url.path not in OPEN_PATHS:
            given = bearer_key(request.headers.get("authorization"))
            if not key_matches(given, keys):
                what = "missing" if given is None else "invalid"
                return _error(OpenAIError(401, f"{what} API key: send 'Authorization: Bearer <key>'",
                                          code="invalid_api_key"))
        try:
            return await call_next(request)
        except OpenAIError as e:
            return _error(e)

    @app.exception_handler(OpenAIError)
    async def openai_error(request, e: OpenAIError):
        return _error(e)

    def ready(generating: bool = False):
        try:
            return front.ready(generating)
        except NotReady as e:
            raise OpenAIError(503, str(e)) from None

    async def body_of(request: Request):
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OpenAIError(400, f"body: not valid JSON: {e}") from None

    @app.get("/health")
    async def health():
        try:
            ready(generating=True)
        except OpenAIError as e:
            return Response(e.message, status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def get_version():
        return {"version": version}

    @app.get("/metrics")
    async def metrics():
        if front.metrics is None:
            raise OpenAIError(503, "metrics start with the model; retry shortly")
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(front.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        info = ready().info
        return {"object": "list", "data": [{
            "id": info.name, "object": "model", "created": int(time.time()), "owned_by": "jaxgen",
            "root": info.name, "max_model_len": info.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        m = ready()
        req = parse(schemas.TokenizeRequest, await body_of(request))
        check_model(req.model, m.info.name)
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError(400, "prompt / messages: give exactly one of them")
        if req.messages is not None:
            fn = lambda: m.tokenizer.encode_chat(chat_messages(req.messages), req.add_generation_prompt)  # noqa: E731
        else:
            fn = lambda: m.tokenizer.encode(req.prompt, None if req.add_special_tokens else False)  # noqa: E731
        try:
            ids = await front.off_loop(fn)
        except ValueError as e:
            raise OpenAIError(400, str(e)) from None
        return {"tokens": ids, "count": len(ids), "max_model_len": m.info.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        m = ready()
        req = parse(schemas.DetokenizeRequest, await body_of(request))
        check_model(req.model, m.info.name)
        try:
            text = await front.off_loop(lambda: m.tokenizer.decode(req.tokens))
        except ValueError as e:
            raise OpenAIError(400, f"tokens: {e}") from None
        return {"prompt": text}

    def generation_endpoint(schema, plan):
        async def generate(request: Request):
            m = ready(generating=True)
            req = parse(schema, await body_of(request))
            gen = await _plan(front, lambda: plan(req, m.tokenizer, m.info))
            return await _run(front, m, _salted(front, gen, req, request), request)
        return generate

    for path, (schema, plan) in ENDPOINTS.items():
        app.add_api_route(path, generation_endpoint(schema, plan), methods=["POST"])

    return app


async def _plan(front: FrontEnd, fn) -> Generation:
    try:
        return await front.off_loop(fn)
    except OpenAIError:
        raise
    except ValueError as e:  # the tokenizer refusing the input
        raise OpenAIError(400, str(e)) from None


def _salted(front: FrontEnd, gen: Generation, req, request: Request) -> Generation:
    """`gen` with the call's prefix-cache salt (its API key, the request, its cache_salt)."""
    return gen.salted(front.salt(bearer_key(request.headers.get("authorization")),
                                 req.cache_salt or ""))


def _submit(m, gen: Generation, responder: Responder):
    """Every choice of `gen` queued on the engine; its streams in choice order."""
    streams = []
    try:
        for p, prompt in enumerate(gen.prompts):
            choices = gen.choices[p * gen.n:(p + 1) * gen.n]
            streams += add_choices(m.engine, prompt, [c.params for c in choices],
                                   [f"{responder.id}-{c.index}" for c in choices])
    except QueueFullError as e:
        _abort(m, streams)
        raise OpenAIError(429, f"{e}; retry later", code="queue_full") from None
    except RequestError as e:
        _abort(m, streams)
        raise OpenAIError(400, str(e)) from None
    except EngineDeadError as e:
        _abort(m, streams)
        raise OpenAIError(503, str(e)) from None
    return streams


def _abort(m, streams) -> None:
    for stream in streams:
        m.engine.abort(stream.request_id)


class _GuardedStream(StreamingResponse):
    """A server-sent event stream whose every write is guarded (`StreamGuard`): once its client
    stops reading, the events are abandoned (the generator closed: the requests are aborted)
    and the connection is left for uvicorn to close; no status can follow a started body."""

    def __init__(self, events, guard: StreamGuard, request_id: str):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._guard, self._request_id = guard, request_id

    async def stream_response(self, send) -> None:
        try:  # Starlette's own loop, every message sent through the guard
            await super().stream_response(lambda message: self._guard.send(send(message)))
        except StreamStalled as e:
            log.warning("request %s: %s", self._request_id, e)
            await self.body_iterator.aclose()


async def _run(front: FrontEnd, m, gen: Generation, request: Request):
    responder = Responder(gen, m.info.name, m.tokenizer)
    streams = _submit(m, gen, responder)
    if gen.stream:
        guard = StreamGuard(streams, front.stream_limits)
        return _GuardedStream(_sse(front, m, responder, streams, guard.check), guard, responder.id)
    with front.call():
        collect = asyncio.ensure_future(_collect(streams))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([collect, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():  # the client left: free the slots and pages
                collect.cancel()
                _abort(m, streams)
    if not collect.done() or collect.cancelled():
        return Response(status_code=499)  # nobody is listening any more
    return responder.body(collect.result())


async def _collect(streams):
    """Each stream's outputs joined into one `Completion`-like result, in choice order."""
    from jaxgen.request_stream import Completion

    parts = {s.request_id: ([], [], []) for s in streams}
    last = {}
    async for index, out in merged_outputs(streams):
        ids, text, logprobs = parts[streams[index].request_id]
        ids.extend(out.token_ids)
        text.append(out.text)
        logprobs.extend(out.logprobs or ())
        if out.finished:
            last[index] = out
    return [Completion(s.request_id, tuple(parts[s.request_id][0]), "".join(parts[s.request_id][1]),
                       last[i].finish_reason, last[i].detail, last[i].usage,
                       tuple(parts[s.request_id][2]) or None)
            for i, s in enumerate(streams)]


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is already read: the next message is the
    disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _event(data) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _sse(front: FrontEnd, m, responder: Responder, streams,
               on_wake=None) -> AsyncIterator[bytes]:
    """The stream: role / echo chunks, one chunk per engine output, the usage chunk, [DONE]. If
    the client goes away, the generator is closed here and the requests are aborted."""
    done = set()
    usages = [None] * len(streams)
    with front.call():
        try:
            for chunk in responder.first_chunks():
                yield _event(chunk)
            async for index, out in merged_outputs(streams, on_wake):
                if out.finished:
                    done.add(index)
                    usages[index] = out.usage
                try:
                    chunk = responder.chunk(responder.gen.choices[index].index, out)
                except OpenAIError as e:  # the engine failed the request mid-stream
                    yield _event(e.body())
                    break
                if chunk is not None:
                    yield _event(chunk)
            else:
                usage = responder.usage_chunk(usages)
                if usage is not None:
                    yield _event(usage)
            yield b"data: [DONE]\n\n"
        finally:
            _abort(m, [s for i, s in enumerate(streams) if i not in done])
