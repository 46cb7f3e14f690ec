"""jaxgen's gRPC front end (`jaxgen serve`, `jaxgen client`), on `grpc.aio`.

The API is protos/jaxgen/v1/generation.proto (stubs in jaxgen.v1). `lifecycle` runs the server:
health (NOT_SERVING until warm-up, while draining, when the engine dies), reflection, API-key
auth, optional TLS, SIGTERM drain. `servicer` answers the RPCs over an `Engine` it shares with
nobody else; `request_mapping` maps proto messages to engine requests (all validation errors name the
field); `stream_bridge` carries engine outputs into asyncio without a thread per stream.
Nothing here is imported by the engine: `jaxgen.engine`, `.runtime` and `.models` never import
grpc.
"""
