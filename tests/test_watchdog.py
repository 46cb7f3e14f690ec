"""The step watchdog and the stream guard, on real engine and stream parts: a device step that
never returns marks the engine hung (an engine on a thread cannot be restarted: the server turns
NOT_SERVING, ends its streams as retryable and stops with an error); a client write that never
completes, or output piling up unsent, ends the stream (tests/test_chaos.py does both to real
`jaxgen serve` processes)."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxgen.config import ServerConfig
from jaxgen.request_stream import RequestOutput, RequestStream
from jaxgen.server.front_end import StreamLimits
from jaxgen.server.stream_bridge import merged_outputs
from jaxgen.server.stream_guard import StreamGuard, StreamStalled
from jaxgen.step_watchdog import StepWatchdog
from jaxgen.v1 import generation_pb2 as pb
from jaxgen.v1 import generation_pb2_grpc as pb_grpc
from tests.test_server_units import InProcessServer


def test_the_watchdog_fires_once_for_a_step_past_its_limit_and_never_between_steps():
    fired = []
    watchdog = StepWatchdog(0.3, fired.append).start()
    for _ in range(5):  # short steps, and idle time between them longer than the limit
        with watchdog.step():
            time.sleep(0.05)
        time.sleep(0.4)
    assert fired == []
    with watchdog.step():
        time.sleep(1.0)
    time.sleep(0.3)
    watchdog.stop()
    assert len(fired) == 1 and fired[0] > 0.3


def test_a_hung_step_on_a_thread_turns_the_server_not_serving_and_stops_it(monkeypatch):
    from jaxgen.engine_api import EngineHungError
    from jaxgen.models import Model
    from jaxgen.server.serving_model import ServingModel
    from tests.helpers import TINY_LLAMA, ByteTokenizer, engine_for

    model = Model(TINY_LLAMA)
    engine = engine_for(model, model.init_random(seed=3), ByteTokenizer(), warmup=True,
                        step_timeout_s=1.5)
    assert engine.info().step_timeout_s == 1.5
    engine.start()
    server = InProcessServer(ServerConfig(port=0, http=False, drain_timeout_s=5),
                             lambda: ServingModel(engine))
    release = threading.Event()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health, stub = health_pb2_grpc.HealthStub(channel), pb_grpc.GenerationStub(channel)
            deadline = time.monotonic() + 60
            while health.Check(health_pb2.HealthCheckRequest()).status != \
                    health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]),
                                         sampling=pb.SamplingParams(max_tokens=3, temperature=0))
            assert sum(len(c.token_ids) for c in stub.Generate(request)) >= 1
            def wedged(launched):  # the next step's tokens never reach the host
                release.wait(120)
                raise RuntimeError("the device came back after the test")

            monkeypatch.setattr(engine.runner, "collect", wedged)
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request, timeout=60))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "hung" in err.value.details() and "step_timeout=1.5s" in err.value.details()
            assert 1.5 <= time.monotonic() - start < 30
            assert server.wait_stopped(60), "the server kept running with a hung engine"
            assert isinstance(engine.dead, EngineHungError) and "hung" in str(server.error)
    finally:
        release.set()
        server.close()


def test_a_write_that_never_completes_ends_the_stream_after_the_stall_timeout():
    async def main():
        guard = StreamGuard([RequestStream("r")], StreamLimits(stall_timeout_s=0.3))
        write = asyncio.get_running_loop().create_future()  # a client that never reads
        start = time.monotonic()
        with pytest.raises(StreamStalled, match="read nothing for stream_stall_timeout=0.3s"):
            await guard.send(write)
        assert write.cancelled() and 0.3 <= time.monotonic() - start < 5
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        await guard.send(done)  # a write that completes passes

    asyncio.run(main())


def test_output_piling_up_unsent_ends_the_stream_before_the_timeout():
    """The engine thread keeps putting outputs while the one write waits: past buffer_tokens
    the guard gives up at once, not after the stall timeout."""
    async def main():
        stream = RequestStream("r")
        guard = StreamGuard([stream], StreamLimits(stall_timeout_s=60, buffer_tokens=8))
        outs = merged_outputs([stream], guard.check)
        stream.put(RequestOutput("r", (1,), "a"))
        assert (await outs.__anext__())[1].token_ids == (1,)
        producer = threading.Thread(target=lambda: [
            (stream.put(RequestOutput("r", (2, 3), "bc")), time.sleep(0.01)) for _ in range(8)])
        start = time.monotonic()
        producer.start()
        with pytest.raises(StreamStalled, match="stream_buffer_tokens=8"):
            await guard.send(asyncio.get_running_loop().create_future())
        assert time.monotonic() - start < 30 and stream.pending_tokens > 8
        producer.join()
        await outs.aclose()

    asyncio.run(main())
