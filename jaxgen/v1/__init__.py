"""Generated gRPC stubs for protos/jaxgen/v1 (`python tools/gen_protos.py`); do not edit.

Imported only by jaxgen.server and clients: the engine never imports grpc or these modules.
"""
