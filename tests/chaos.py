"""The harness of tests/test_chaos.py: a real `jaxgen serve` process (SmolLM2-135M, the
test_server flags, the engine in its own process, two API keys) and what the chaos tests do to
it — 64 gRPC streams at once, signals to its engine process, clients that stop reading — and
check afterwards: health, /metrics, the server's stats, the greedy tokens of a clean run."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx2 as httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxgen.v1 import generation_pb2 as pb
from jaxgen.v1 import generation_pb2_grpc as pb_grpc
from tests.server_process import BearerKey, ServerProcess, wait_gone

KEYS = ("chaos-key-a", "chaos-key-b")
STREAM_TIMEOUT_S = 240  # a stream's own deadline: ending by it counts as hanging
SLOTS = 8
TOPICS = ["the sea", "a mountain", "autumn", "a city at night", "coffee", "the moon", "trains",
          "a library"]
REQUESTS = [pb.GenerateRequest(text=f"Fact {i} about {TOPICS[i % 8]}:", sampling=pb.SamplingParams(
    max_tokens=4 + i % 5, temperature=0.0)) for i in range(64)]
# A request long enough to outlive any test that starts it: 120 engine steps.
LONG = pb.SamplingParams(max_tokens=480, temperature=0.0, ignore_eos=True, logprobs=20)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Chaos:
    def __init__(self, server: ServerProcess):
        self.server = server
        self.target = f"127.0.0.1:{server.port}"
        self.http = f"http://127.0.0.1:{server.http_port}"
        self.raw = grpc.insecure_channel(self.target)
        self.channel = grpc.intercept_channel(self.raw, BearerKey(KEYS[0]))
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.raw)
        self.metrics_url = re.search(r"metrics on (http://[^\s]+)", server.log).group(1)
        start = time.monotonic()
        self.reference = [tokens for tokens, _, _ in self.run(REQUESTS)]
        self.reference_seconds = time.monotonic() - start

    def stub_for(self, key: str, **options) -> pb_grpc.GenerationStub:
        channel = grpc.insecure_channel(self.target, options=list(options.items()))
        return pb_grpc.GenerationStub(grpc.intercept_channel(channel, BearerKey(key)))

    def engine_pid(self) -> int:
        """The current engine process: the last one the server started."""
        pids = re.findall(r"engine=process pid=(\d+)|restarted in [\d.]+s \(pid (\d+)\)",
                          self.server.log)
        return int(next(p for p in reversed(pids[-1]) if p))

    def stats(self) -> pb.ServerStats:
        return self.stub.GetServerStats(pb.GetServerStatsRequest(), timeout=30)

    def status(self):
        return self.health.Check(health_pb2.HealthCheckRequest(), timeout=10).status

    def wait_status(self, want, timeout_s: float = 240) -> float:
        start = time.monotonic()
        while self.status() != want:
            assert time.monotonic() - start < timeout_s, f"not {want}:\n{self.server.log[-3000:]}"
            time.sleep(0.1)
        return time.monotonic() - start

    def scrape(self) -> dict[str, float]:
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                         if line and not line.startswith("#"))}

    def run(self, requests, on_output=None):
        """Streams every request at once; for each (tokens, status code, details)."""
        def one(request):
            tokens = []
            try:
                for response in self.stub.Generate(request, timeout=STREAM_TIMEOUT_S):
                    tokens += response.token_ids
                    if on_output is not None and response.token_ids:
                        on_output()
                return tokens, grpc.StatusCode.OK, ""
            except grpc.RpcError as e:
                return tokens, e.code(), e.details()

        with ThreadPoolExecutor(len(requests)) as pool:
            return list(pool.map(one, requests))

    def run_killed(self, sig=signal.SIGKILL):
        """REQUESTS streamed while the engine process gets `sig` once some have output."""
        pid, started = self.engine_pid(), threading.Event()
        killer = threading.Thread(target=lambda: started.wait(60) and os.kill(pid, sig))
        killer.start()
        results = self.run(REQUESTS, on_output=started.set)
        killer.join()
        assert wait_gone(pid, 60), "the engine process was not replaced"
        return results

    def check_round(self, results) -> int:
        """Every stream ended ok and exact, or UNAVAILABLE after streaming output; both
        happened; the server serves again, exactly, holding nothing. The failed ones' count."""
        kept = failed = 0
        for (tokens, code, details), want in zip(results, self.reference):
            assert code != grpc.StatusCode.DEADLINE_EXCEEDED, "a stream hung"
            if code == grpc.StatusCode.OK:
                assert tokens == want
                kept += 1
            else:
                assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
                assert tokens and "engine unavailable" in details and "retried" in details
                failed += 1
        assert kept and failed
        self.wait_status(SERVING)
        assert [t for t, _, _ in self.run(REQUESTS[:4])] == self.reference[:4]
        self.wait_idle()
        return failed

    def wait_idle(self, timeout_s: float = 30) -> float:
        """Seconds until no request holds a slot or a page."""
        start = time.monotonic()
        while True:
            s = self.stats()
            if s.num_running == s.num_waiting == s.num_pages_used == 0:
                assert s.num_free_slots == SLOTS
                return time.monotonic() - start
            assert time.monotonic() - start < timeout_s, f"a slot or page is held: {s}"
            time.sleep(0.05)


def http_stream(chaos: Chaos, i: int, started: threading.Event):
    """REQUESTS[i] streamed over HTTP: (text, the error object of an error event or None)."""
    body = {"prompt": REQUESTS[i].text, "max_tokens": REQUESTS[i].sampling.max_tokens,
            "temperature": 0, "stream": True}
    text, error = [], None
    with httpx.stream("POST", chaos.http + "/v1/completions", json=body, timeout=STREAM_TIMEOUT_S,
                      headers={"Authorization": f"Bearer {KEYS[0]}"}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    error = event["error"]
                else:
                    text.append(event["choices"][0]["text"])
                    started.set()
    return "".join(text), error


def unread_http_stream(chaos: Chaos) -> socket.socket:
    """A streamed chat completion (top-20 logprobs: large events) on a socket with a small
    receive buffer that nobody reads."""
    body = json.dumps({"messages": [{"role": "user", "content": "Tell me a long story."}],
                       "max_tokens": 460, "temperature": 0, "ignore_eos": True,
                       "logprobs": True, "top_logprobs": 20, "stream": True}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", chaos.server.http_port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                 b"Content-Type: application/json\r\nAuthorization: Bearer " + KEYS[0].encode() +
                 b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock
