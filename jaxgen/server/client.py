"""A small synchronous client of jaxgen.v1.Generation (what `jaxgen client` uses).

`connect` opens a channel (TLS when given a CA certificate), `generate_request` builds the
request, `generate` starts the streaming call with the API key, `collect` prints text as it
arrives and returns the completion as plain data.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from google.protobuf import json_format

from jaxgen.config import grpc_target
from jaxgen.v1 import generation_pb2 as pb
from jaxgen.v1 import generation_pb2_grpc as pb_grpc


def connect(host: str, port: int, tls_ca: bytes | None = None) -> grpc.Channel:
    target = grpc_target(host, port)
    if tls_ca is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=tls_ca))


def generate_request(prompt: str, *, chat: bool = False, system: str | None = None,
                     request_id: str = "", priority: int = 0, stop=(), **sampling) -> pb.GenerateRequest:
    """`sampling`: SamplingParams fields; None values are left unset (server defaults)."""
    params = pb.SamplingParams(stop=list(stop), **{k: v for k, v in sampling.items() if v is not None})
    request = pb.GenerateRequest(request_id=request_id, sampling=params, priority=priority)
    if chat:
        turns = ([pb.ChatMessage(role="system", content=system)] if system is not None else [])
        request.messages.messages.extend(turns + [pb.ChatMessage(role="user", content=prompt)])
    else:
        request.text = prompt
    return request


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def generate(channel: grpc.Channel, request: pb.GenerateRequest, api_key: str | None = None,
             timeout: float | None = None) -> Iterator[pb.GenerateResponse]:
    stub = pb_grpc.GenerationStub(channel)
    return stub.Generate(request, timeout=timeout, metadata=auth_metadata(api_key))


def collect(responses, echo=None) -> dict:
    """Reads the stream to its end, writing each text delta to `echo` (a text file) if given.
    Returns {"request_id", "text", "token_ids", "finish_reason", "finish_detail", "usage",
    "logprobs"}."""
    text, ids, logprobs, last = [], [], [], pb.GenerateResponse()
    for last in responses:
        if echo is not None and last.text:
            echo.write(last.text)
            echo.flush()
        text.append(last.text)
        ids.extend(last.token_ids)
        logprobs.extend(json_format.MessageToDict(lp, preserving_proto_field_name=True)
                        for lp in last.logprobs)
    reason = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
    return {"request_id": last.request_id, "text": "".join(text), "token_ids": ids,
            "finish_reason": reason, "finish_detail": last.finish_detail,
            "usage": json_format.MessageToDict(last.usage, preserving_proto_field_name=True,
                                                 always_print_fields_with_no_presence=True),
            "logprobs": logprobs}
