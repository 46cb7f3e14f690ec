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
from typing import NamedTuple

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


class Ended(NamedTuple):
    """How one stream ended."""

    tokens: list[int]
    code: grpc.StatusCode
    details: str
    first_output_at: float | None  # time.monotonic() when its first token arrived
    queue_time_s: float | None  # from its final usage (a stream that ended ok)


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
        self.reference = [ended.tokens for ended in self.run(REQUESTS)]
        self.reference_seconds = time.monotonic() - start

    def stub_for(self, key: str, **options) -> pb_grpc.GenerationStub:
        channel = grpc.insecure_channel(self.target, options=list(options.items()))
        return pb_grpc.GenerationStub(grpc.intercept_channel(channel, BearerKey(key)))

    def engine_pid(self) -> int:
        """The current engine process: the last one the server started."""
        return self.server.engine_pid

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

    def run(self, requests, on_output=None, on_end=None) -> list[Ended]:
        """Streams every request at once; how each ended (also passed to `on_end` as it ends).
        `on_output(t)` is called at each stream's first output, with its time."""
        def one(request):
            ended = stream(request)
            if on_end is not None:
                on_end(ended)
            return ended

        def stream(request):
            tokens, first, usage = [], None, None
            try:
                for response in self.stub.Generate(request, timeout=STREAM_TIMEOUT_S):
                    if response.token_ids and first is None:
                        first = time.monotonic()
                        if on_output is not None:
                            on_output(first)
                    tokens += response.token_ids
                    usage = response.usage if response.HasField("usage") else usage
                queue_time = usage.queue_time_s if usage is not None and \
                    usage.HasField("queue_time_s") else None
                return Ended(tokens, grpc.StatusCode.OK, "", first, queue_time)
            except grpc.RpcError as e:
                return Ended(tokens, e.code(), e.details(), first, None)

        with ThreadPoolExecutor(len(requests)) as pool:
            return list(pool.map(one, requests))

    def run_killed(self, sig=signal.SIGKILL) -> tuple[list[Ended], float, int]:
        """REQUESTS streamed while the engine process gets `sig` once every one has reached the
        engine (one that reached the server only during the restart would be refused,
        UNAVAILABLE with no output: the answer to a request that arrives while the engine
        restarts, not what this round checks) and some stream is mid-output (requests of a few
        tokens: the first ones can end before the last is admitted, and a kill with nobody
        mid-output fails nobody); how each ended, when the signal was sent, and the length of
        the server's log then."""
        pid, sent, ended, first_outputs = self.engine_pid(), [], [], []

        def admitted() -> int:
            # Ended streams first: a stream seen ended here has ended on the server too, so it
            # is not also among the server's active ones (no request is counted twice).
            done = len(ended)
            return done + self.stats().active_streams

        def streaming() -> bool:
            # Streams with output, less the ended ones with output (each had its first output
            # before it ended).
            done = sum(e.first_output_at is not None for e in list(ended))
            return len(first_outputs) > done

        def kill():
            deadline = time.monotonic() + 60
            while admitted() < len(REQUESTS) or not streaming():
                if time.monotonic() > deadline:
                    return
                time.sleep(0.005)
            sent.append((time.monotonic(), len(self.server.log)))
            os.kill(pid, sig)

        killer = threading.Thread(target=kill)
        killer.start()
        results = self.run(REQUESTS, on_output=first_outputs.append, on_end=ended.append)
        killer.join()
        assert sent, "within 60s, not every request reached the engine or none was mid-output"
        assert wait_gone(pid, 60), "the engine process was not replaced"
        return (results, *sent[0])

    def check_round(self, results: list[Ended], killed_at: float, log_at_kill: int) -> int:
        """Every stream ended ok and exact, or UNAVAILABLE after streaming output; both
        happened, and some streams with no output at the kill were kept and ran on the new
        engine, with exactly the greedy tokens of the clean run (so the new engine's greedy
        output is exact), their wait, the restart included, shown as queue time; the server
        serves again, holding nothing once they are done. The failed ones' count."""
        self.wait_status(SERVING)
        restart_s = float(self.wait_log(r"engine process restarted in ([\d.]+)s", log_at_kill))
        kept = failed = 0
        for ended, want in zip(results, self.reference):
            assert ended.code != grpc.StatusCode.DEADLINE_EXCEEDED, "a stream hung"
            if ended.code == grpc.StatusCode.OK:
                assert ended.tokens == want
                # First output a second after the kill: the new engine's (the old one's last
                # words arrive within milliseconds; a new process takes seconds to start).
                if ended.first_output_at > killed_at + 1.0:
                    assert ended.queue_time_s >= restart_s - 0.1, (ended, restart_s)
                    kept += 1
            else:
                assert ended.code == grpc.StatusCode.UNAVAILABLE, ended
                assert ended.tokens and ended.first_output_at < killed_at + 1.0, ended
                assert "engine unavailable" in ended.details and "retried" in ended.details
                failed += 1
        assert kept and failed, (kept, failed)
        self.wait_idle()
        return failed

    def wait_log(self, pattern: str, start: int, timeout_s: float = 30) -> str:
        """The first group of `pattern` in the server's log past offset `start`, once there."""
        deadline = time.monotonic() + timeout_s
        while not (found := re.search(pattern, self.server.log[start:])):
            assert time.monotonic() < deadline, f"no {pattern!r}:\n{self.server.log[-3000:]}"
            time.sleep(0.05)
        return found.group(1)

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
