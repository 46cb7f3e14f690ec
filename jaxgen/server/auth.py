"""API-key authentication: a `grpc.aio` server interceptor.

With keys configured, every call must carry the metadata `authorization: Bearer <key>` with one
of them, or it ends with UNAUTHENTICATED before its handler runs. The standard health service is
open (load balancers and orchestrators probe it without credentials); reflection is not. Keys are
compared in constant time. Knows nothing about the service behind it.
"""

from __future__ import annotations

import hmac

import grpc
from grpc import aio

HEALTH_SERVICE = "grpc.health.v1.Health"


def bearer_key(header: str | bytes | None) -> str | None:
    """The key of an `authorization: Bearer <key>` header value; None without one."""
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    if not header or not header.startswith("Bearer "):
        return None
    return header[len("Bearer "):].strip()


def key_matches(given: str | None, keys: list[bytes]) -> bool:
    """Whether `given` is one of `keys`, compared in constant time; every key is compared, so
    the time taken does not tell which one nearly matched."""
    if given is None:
        return False
    given_bytes = given.encode("latin-1", "replace")
    return any([hmac.compare_digest(given_bytes, key) for key in keys])


def metadata_key(metadata) -> str | None:
    """The bearer key of a call's metadata (None without one)."""
    return bearer_key(next((v for k, v in metadata or () if k == "authorization"), None))


class ApiKeyInterceptor(aio.ServerInterceptor):
    def __init__(self, api_keys, open_services=(HEALTH_SERVICE,)):
        if not api_keys:
            raise ValueError("api_keys=(): at least one key is needed to authenticate")
        self._keys = [k.encode() for k in api_keys]
        self._open = tuple(f"/{s}/" for s in open_services)

    def authorized(self, metadata) -> bool:
        return key_matches(metadata_key(metadata), self._keys)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._open):
            return handler
        if self.authorized(details.invocation_metadata):
            return handler
        missing = not any(k == "authorization" for k, _ in details.invocation_metadata or ())
        return _refusing(handler, "missing metadata 'authorization: Bearer <api key>'" if missing
                         else "invalid API key in metadata 'authorization'")


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with UNAUTHENTICATED."""
    async def refuse(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_streaming(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # makes this an async generator, as a streaming handler must be

    codecs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_streaming, **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **codecs)
    return grpc.stream_stream_rpc_method_handler(refuse_streaming, **codecs)
