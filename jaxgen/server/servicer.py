"""`GenerationServicer`: the jaxgen.v1.Generation RPCs over one `Engine`.

`Generate` validates and tokenizes the request (tokenization on a small thread pool, off the
event loop), salts it for the prefix cache (`FrontEnd.salted`), queues it on the engine with the
call's deadline, and writes the engine's outputs to the call (see `stream_bridge`), each write
guarded (`stream_guard`). A call that ends before its request does — cancelled by the client, its
deadline passed, the connection gone, its client not reading — aborts the request, so its slot
and pages are freed at the next engine step. The servicer keeps the ids of requests the engine still holds (for `Abort` and
for refusing a duplicate id) and counts calls in progress (for the drain).

Status codes: INVALID_ARGUMENT (bad request; the message names the field), RESOURCE_EXHAUSTED
(waiting queue full, the request shed from it, or its client not reading), ALREADY_EXISTS
(duplicate request id in flight), DEADLINE_EXCEEDED, UNAVAILABLE (warming up, draining, the
engine restarting or dead, or lost after the request had streamed, or a process of a
multi-process engine lost: retryable), INTERNAL (the engine failed the request).
`CaptureProfile` (admin) records a profiler trace and streams its files back; FAILED_PRECONDITION
while another capture runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import grpc

from jaxgen.profiling import ProfileBusyError, trace_chunks
from jaxgen.engine_api import EngineDeadError, QueueFullError, add_choices
from jaxgen.server import request_mapping as rm
from jaxgen.server.auth import metadata_key
from jaxgen.server.front_end import FrontEnd, NotReady
from jaxgen.server.serving_model import ServingModel, model_info, server_stats
from jaxgen.server.stream_bridge import drain, merged_outputs, wake_on
from jaxgen.server.stream_guard import StreamGuard, StreamStalled
from jaxgen.v1 import generation_pb2 as pb
from jaxgen.v1 import generation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
Code = grpc.StatusCode
PROFILE_CHUNK_BYTES = 1 << 20
# How a request that ended without its result ends the call (RequestOutput.outcome -> status).
FAILED = {"error": Code.INTERNAL, "unavailable": Code.UNAVAILABLE,
          "shed": Code.RESOURCE_EXHAUSTED, "deadline_exceeded": Code.DEADLINE_EXCEEDED}


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, front: FrontEnd):
        self.front = front
        # The engine ids of each call's request id still held by the engine (one per choice).
        self._in_engine: dict[str, list[str]] = {}

    @property
    def active_streams(self) -> int:
        return self.front.active_calls

    async def _ready(self, context, generating: bool = False) -> ServingModel:
        try:
            return self.front.ready(generating)
        except NotReady as e:
            await context.abort(Code.UNAVAILABLE, str(e))

    # -- Generate ---------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context):
        m = await self._ready(context, generating=True)
        try:
            request_id = rm.request_id(request.request_id) or uuid.uuid4().hex
            prompt_ids = await self.front.off_loop(rm.prompt_source(request, m.tokenizer))
            params = self.front.salted(rm.choices(request, rm.sampling_params(
                request.sampling, request.priority, len(prompt_ids), m.max_context)),
                metadata_key(context.invocation_metadata()), request.cache_salt)
        except ValueError as e:  # InvalidRequest, or the tokenizer / chat template refusing
            await context.abort(Code.INVALID_ARGUMENT, str(e))
        if request_id in self._in_engine:
            await context.abort(Code.ALREADY_EXISTS,
                                f"request_id={request_id!r}: a request with this id is in flight")
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        ids = [request_id] if len(params) == 1 else [f"{request_id}/{i}" for i in range(len(params))]
        try:
            streams = add_choices(m.engine, prompt_ids, params, ids, deadline)
        except QueueFullError as e:
            await context.abort(Code.RESOURCE_EXHAUSTED, f"{e}; retry later")
        except ValueError as e:
            await context.abort(Code.INVALID_ARGUMENT, str(e))
        except EngineDeadError as e:
            await context.abort(Code.UNAVAILABLE, str(e))
        self._in_engine[request_id] = ids
        await self._stream(m, request_id, streams, context)

    async def _stream(self, m: ServingModel, request_id: str, streams, context):
        """Writes the engine's outputs to the call (each write guarded: a client that stops
        reading ends the call with RESOURCE_EXHAUSTED and its request is aborted)."""
        finished, stalled = set(), None
        guard = StreamGuard(streams, self.front.stream_limits)
        with self.front.call():
            try:
                async with contextlib.aclosing(merged_outputs(streams, guard.check)) as outs:
                    async for index, out in outs:
                        if out.finished:
                            finished.add(index)
                        code = FAILED.get(out.outcome)
                        if code is Code.INTERNAL:
                            await context.abort(code, f"request {request_id} failed: {out.detail}")
                        if code is not None:
                            await context.abort(code, out.detail)
                        await guard.send(context.write(rm.response(out, request_id, index)))
            except StreamStalled as e:
                log.warning("request %s: %s", request_id, e)
                stalled = e
            finally:
                left = [s for i, s in enumerate(streams) if i not in finished]
                if not left:
                    self._in_engine.pop(request_id, None)
                else:  # the call ended first: free the slots and pages at the next step
                    for stream in left:
                        m.engine.abort(stream.request_id)
                    self._forget_when_done(request_id, left)
        if stalled is not None:
            await context.abort(Code.RESOURCE_EXHAUSTED, str(stalled))

    def _forget_when_done(self, request_id: str, streams) -> None:
        """Keeps the id reserved until the engine's final output of every choice arrives."""
        pending = set(range(len(streams)))

        def check(i):
            if any(out.finished for out in drain(streams[i])):
                pending.discard(i)
                if not pending:
                    self._in_engine.pop(request_id, None)
        loop = asyncio.get_running_loop()
        for i, stream in enumerate(streams):
            stream.notify(wake_on(loop, lambda i=i: check(i)))

    # -- the other RPCs ---------------------------------------------------------------------

    async def Abort(self, request: pb.AbortRequest, context):
        m = await self._ready(context)
        ids = self._in_engine.get(request.request_id)
        for engine_id in ids or ():
            m.engine.abort(engine_id)
        return pb.AbortResponse(found=ids is not None)

    async def Tokenize(self, request: pb.TokenizeRequest, context):
        m = await self._ready(context)
        kind = request.WhichOneof("input")
        try:
            if kind is None:
                raise rm.InvalidRequest("input: one of text, messages is required")
            if kind == "text":
                add_bos = request.add_bos if request.HasField("add_bos") else None
                ids = await self.front.off_loop(lambda: m.tokenizer.encode(request.text, add_bos))
            else:
                messages = rm.chat_messages(request.messages.messages, "messages.messages")
                ids = await self.front.off_loop(lambda: m.tokenizer.encode_chat(messages))
        except ValueError as e:
            await context.abort(Code.INVALID_ARGUMENT, str(e))
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request: pb.DetokenizeRequest, context):
        m = await self._ready(context)
        ids = list(request.token_ids)
        try:
            text = await self.front.off_loop(lambda: m.tokenizer.decode(ids, request.skip_special_tokens))
        except ValueError as e:
            await context.abort(Code.INVALID_ARGUMENT, f"token_ids: {e}")
        return pb.DetokenizeResponse(text=text)

    async def GetModelInfo(self, request, context):
        return model_info(await self._ready(context))

    async def GetServerStats(self, request, context):
        return server_stats(await self._ready(context), self.active_streams)

    async def CaptureProfile(self, request: pb.CaptureProfileRequest, context):
        m = await self._ready(context)
        try:
            # Off the event loop: the trace must see the server serving meanwhile.
            directory = await asyncio.to_thread(m.engine.capture_profile, request.duration_s)
        except ValueError as e:
            await context.abort(Code.INVALID_ARGUMENT, str(e))
        except ProfileBusyError as e:
            await context.abort(Code.FAILED_PRECONDITION, str(e))
        except TimeoutError as e:  # the engine did not pause for the profiler to switch
            await context.abort(Code.UNAVAILABLE, str(e))
        except EngineDeadError as e:  # the engine (process) is gone
            await context.abort(Code.UNAVAILABLE, f"the engine has failed: {e}")
        for path, offset, data, last in trace_chunks(directory, PROFILE_CHUNK_BYTES):
            yield pb.ProfileChunk(server_dir=directory, path=path, offset=offset, data=data,
                                  last=last)
