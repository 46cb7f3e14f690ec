"""The server fixtures shared by the gRPC and HTTP tests: one real `jaxgen serve` process per
engine mode (a small model cut from SmolLM2-135M, API key required, HTTP on beside gRPC) for the whole session, and the
offline engine's greedy completions of the same requests (in a process of its own)."""

from __future__ import annotations

import time

import grpc
import pytest

from jaxgen.v1 import generation_pb2 as pb
from jaxgen.v1 import generation_pb2_grpc as pb_grpc
from tests.server_process import (ENGINE_MODES, BearerKey, OfflineCompletions,
                                  ServerProcess, engine_flags, engine_mode_flags,
                                  ensure_model)

API_KEY = "test-key-5d1c"
METADATA = (("authorization", f"Bearer {API_KEY}"),)
VOCAB, CONTEXT, DECODE_STEPS, SLOTS = 49152, 512, 4, 8
# A request the engine would otherwise run for ~120 steps: its early end is unmistakable.
LONG = dict(max_tokens=480, temperature=0.0, ignore_eos=True)
# Freed by the update of the step in flight or of the one launched ahead of it: on the 2-core CPU
# box a step (4 decode tokens for 8 slots, perhaps a 64-token prefill) takes 0.3-1.2 s, and a
# LONG request would run for about two minutes.
FREED_WITHIN_S = 8.0

STREAMED = [
    {"text": "The capital of France is", "max_tokens": 16},
    {"messages": [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "Name three colours."}], "max_tokens": 24},
    {"text": "def fibonacci(n):", "max_tokens": 24, "stop": ["\n\n"]},
]
TOPICS = ["the sea", "a mountain", "autumn", "a city at night", "coffee", "the moon", "trains",
          "a library"]
CONCURRENT = [
    ({"messages": [{"role": "user", "content": f"Write one sentence about {TOPICS[i % 8]}."}]}
     if i % 5 == 0 else {"text": f"Fact {i} about {TOPICS[i % 8]}:"}) | {"max_tokens": 1 + (7 * i) % 24}
    for i in range(64)
]


def as_request(spec: dict, **extra) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0,
                                 stop=spec.get("stop", ()))
    if "messages" in spec:
        msgs = pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in spec["messages"]])
        return pb.GenerateRequest(messages=msgs, sampling=sampling, **extra)
    return pb.GenerateRequest(text=spec["text"], sampling=sampling, **extra)


class Served:
    def __init__(self, server: ServerProcess, offline: OfflineCompletions):
        self.server, self.offline = server, offline
        self.target = f"127.0.0.1:{server.port}"
        self.http = f"http://127.0.0.1:{server.http_port}"
        self.raw = grpc.insecure_channel(self.target)  # no key
        self.channel = grpc.intercept_channel(self.raw, BearerKey(API_KEY))
        self.stub = pb_grpc.GenerationStub(self.channel)

    def stats(self) -> pb.ServerStats:
        return self.stub.GetServerStats(pb.GetServerStatsRequest())

    def wait_idle(self) -> float:
        """Seconds until no request holds a slot or a page."""
        start = time.monotonic()
        while time.monotonic() - start < 30:
            s = self.stats()
            if s.num_running == 0 and s.num_waiting == 0 and s.num_pages_used == 0:
                assert s.num_free_slots == SLOTS
                return time.monotonic() - start
            time.sleep(0.01)
        raise AssertionError(f"still busy after 30s: {self.stats()}")

    def wait_running(self, n: int = 1) -> pb.ServerStats:
        for _ in range(1000):
            s = self.stats()
            if s.num_running == n:
                return s
            time.sleep(0.01)
        raise AssertionError(f"expected {n} running: {self.stats()}")


@pytest.fixture(scope="session")
def offline(tmp_path_factory, cache_dir, xla_cache_dir):
    """Started before the first server: the reference runs while it warms up."""
    ensure_model(cache_dir)
    return OfflineCompletions(STREAMED + CONCURRENT, tmp_path_factory.mktemp("offline"),
                              cache_dir, xla_cache_dir)


@pytest.fixture(scope="session", params=ENGINE_MODES)
def served(request, offline, tmp_path_factory, cache_dir, xla_cache_dir):
    """Every test runs against the engine on a thread of the server and in its own process."""
    work = tmp_path_factory.mktemp("server")
    keys = work / "api-keys.txt"
    keys.write_text(f"# keys for the test server\n{API_KEY}\n")
    server = ServerProcess([*engine_flags(cache_dir), *engine_mode_flags(request.param), "--api-keys-file",
                            str(keys)], work / "server.log", cache_dir, xla_cache_dir)
    try:
        server.wait_listening()
        served = Served(server, offline)
        server.wait_serving(served.raw)
        yield served
        served.raw.close()
    finally:
        server.stop()


