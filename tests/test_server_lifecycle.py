"""A `jaxgen serve` process over TLS, from a serving preset with a waiting-queue bound of 2:
health through warm-up, the TLS round trip, `jaxgen client`, RESOURCE_EXHAUSTED past the queue
bound, displacement by priority, the engine process killed and replaced, and (last of the tests
using it: it ends the process) the SIGTERM drain, of the restarted engine process. Then SIGTERM
during warm-up, on a process of its own."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import httpx2 as httpx  # what the openai client itself uses
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxgen.v1 import generation_pb2 as pb
from jaxgen.v1 import generation_pb2_grpc as pb_grpc
from tests.server_process import (ENGINE_MODES, ROOT, ServerProcess, child_env, child_pids,
                                  engine_mode_flags,
                                  ensure_model, self_signed_certificate, wait_gone)

# The preset gives slots 8, decode steps 4 and prefill 64; the flags override the rest and the
# model (the small model and shapes of tests/test_server.py's server, so its compilations are
# reused).
# The drain's cap is well above what the SIGTERM test's three requests take on a loaded 2-core
# box (seen: over 30 s there, with other work on both cores): the test checks that in-flight
# requests finish, not when the cap cuts them off.
FLAGS = ("--config", str(ROOT / "configs" / "serving" / "cpu-small.json"), "--max-model-len", "512",
         "--num-pages", "256", "--max-waiting", "2", "--drain-timeout", "120")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class TlsServer:
    def __init__(self, server, cert_path):
        self.server, self.cert_path = server, cert_path
        self.target = f"127.0.0.1:{server.port}"
        credentials = grpc.ssl_channel_credentials(root_certificates=cert_path.read_bytes())
        self.channel = grpc.secure_channel(self.target, credentials)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.warmup_statuses: list[str] = []
        self.warmup_generate: tuple | None = None  # (code, details) of a Generate during warm-up
        self.warmup_http: tuple | None = None  # (/health, /v1/completions) during warm-up
        # The HTTP API shares the TLS certificate.
        self.http = httpx.Client(base_url=f"https://127.0.0.1:{server.http_port}",
                                 verify=str(cert_path), timeout=60)

    def probe_while_warming(self, status: str) -> None:
        if status == "NOT_SERVING" and self.warmup_generate is None:
            try:
                list(self.stub.Generate(pb.GenerateRequest(text="too early"), timeout=10))
                self.warmup_generate = (grpc.StatusCode.OK, "")
            except grpc.RpcError as e:
                self.warmup_generate = (e.code(), e.details())
            self.warmup_http = (self.http.get("/health"),
                                self.http.post("/v1/completions", json={"prompt": "too early"}))


@pytest.fixture(scope="module", params=ENGINE_MODES)
def tls(request, tmp_path_factory, cache_dir, xla_cache_dir):
    model = ensure_model(cache_dir)
    work = tmp_path_factory.mktemp("tls-server")
    cert, key = self_signed_certificate(work)
    server = ServerProcess([*FLAGS, "--model", model, *engine_mode_flags(request.param), "--tls-cert", str(cert),
                            "--tls-key", str(key)], work / "server.log", cache_dir, xla_cache_dir)
    try:
        server.wait_listening()
        tls = TlsServer(server, cert)
        tls.warmup_statuses = server.wait_serving(tls.channel, on_poll=tls.probe_while_warming)
        yield tls
        tls.channel.close()
    finally:
        server.stop()


def test_health_is_not_serving_until_warm_up_is_done(tls):
    assert tls.warmup_statuses == ["NOT_SERVING", "SERVING"]
    code, details = tls.warmup_generate
    assert code == grpc.StatusCode.UNAVAILABLE and "warming up" in details
    health, completion = tls.warmup_http  # the HTTP API answers 503 meanwhile, over TLS too
    assert health.status_code == 503 and completion.status_code == 503
    assert "warming up" in completion.json()["error"]["message"]
    assert completion.headers["Retry-After"]
    assert tls.http.get("/health").status_code == 200
    for service in ("", "jaxgen.v1.Generation"):
        assert tls.health.Check(health_pb2.HealthCheckRequest(service=service)).status == SERVING


def test_tls_round_trip_and_plaintext_refused(tls):
    chunks = list(tls.stub.Generate(pb.GenerateRequest(
        text="The capital of France is", sampling=pb.SamplingParams(max_tokens=4, temperature=0))))
    assert sum(len(c.token_ids) for c in chunks) == 4 and chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    with grpc.insecure_channel(tls.target) as plain:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.GenerationStub(plain).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_preset_values_apply_and_flags_win(tls):
    info = tls.stub.GetModelInfo(pb.GetModelInfoRequest())
    preset = json.loads((ROOT / "configs" / "serving" / "cpu-small.json").read_text())
    assert info.decode_steps == preset["decode-steps"] == 4  # from the preset (default: 8)
    assert info.num_slots == preset["slots"]
    assert (info.max_context_length, info.num_pages, info.max_waiting) == (512, 256, 2)  # flags


def run_client(tls, *args):
    return subprocess.run([sys.executable, "-m", "jaxgen.cli", "client", *args, "--port",
                           str(tls.server.port)], capture_output=True, text=True, env=child_env(),
                          cwd=ROOT, timeout=120)


def test_jaxgen_client_streams_to_the_terminal(tls):
    expected = "".join(c.text for c in tls.stub.Generate(pb.GenerateRequest(
        text="The capital of France is", sampling=pb.SamplingParams(max_tokens=8, temperature=0))))
    run = run_client(tls, "The capital of France is", "--max-tokens", "8", "--tls-ca",
                     str(tls.cert_path))
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected + "\n"
    assert "[8 tokens, finish: length]" in run.stderr
    run = run_client(tls, "Hi", "--chat", "--max-tokens", "5", "--json", "--tls-ca", str(tls.cert_path))
    result = json.loads(run.stdout)
    assert result["finish_reason"] in ("stop", "length") and len(result["token_ids"]) <= 5
    assert result["usage"]["completion_tokens"] == len(result["token_ids"])
    refused = run_client(tls, "Hi")  # plaintext to a TLS port
    assert refused.returncode == 1 and refused.stderr.strip().startswith("jaxgen: error: UNAVAILABLE")
    assert "Traceback" not in refused.stderr


def test_queue_bound_answers_resource_exhausted_and_queued_requests_complete(tls):
    """24 requests arriving together: the engine admits waiting requests into slots only between
    steps, so while a step runs the burst fills the 2-request waiting queue and the rest are
    refused at once; every accepted request runs to completion."""
    credentials = grpc.ssl_channel_credentials(root_certificates=tls.cert_path.read_bytes())

    async def one(stub, i):
        request = pb.GenerateRequest(text=f"Tell me about number {i}.", sampling=pb.SamplingParams(
            max_tokens=24, temperature=0, ignore_eos=True))
        try:
            return [c async for c in stub.Generate(request)]
        except grpc.aio.AioRpcError as e:
            return e

    async def burst():
        async with grpc.aio.secure_channel(tls.target, credentials) as channel:
            stub = pb_grpc.GenerationStub(channel)
            await stub.GetModelInfo(pb.GetModelInfoRequest())  # connected before the burst
            return await asyncio.gather(*(one(stub, i) for i in range(24)))

    results = asyncio.run(burst())
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    served = [r for r in results if not isinstance(r, grpc.aio.AioRpcError)]
    assert refused and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
    assert all("max_waiting=2" in e.details() for e in refused)
    assert len(served) >= 3  # at least the first (admitted) and a full queue behind it
    for chunks in served:
        assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert sum(len(c.token_ids) for c in chunks) == chunks[-1].usage.completion_tokens == 24


def test_http_answers_429_past_the_queue_bound_while_queued_requests_complete(tls):
    """The same burst as above through the HTTP API: 429 with Retry-After for those the
    2-request waiting queue cannot hold; every accepted one completes."""
    async def one(client, i):
        return await client.post("/v1/completions", json={
            "prompt": f"Tell me about number {i}.", "max_tokens": 24, "temperature": 0,
            "ignore_eos": True})

    async def burst():
        async with httpx.AsyncClient(base_url=str(tls.http.base_url), verify=str(tls.cert_path),
                                     timeout=120) as client:
            await client.get("/v1/models")  # connected before the burst
            return await asyncio.gather(*(one(client, i) for i in range(24)))

    responses = asyncio.run(burst())
    refused = [r for r in responses if r.status_code != 200]
    served = [r for r in responses if r.status_code == 200]
    assert refused and all(r.status_code == 429 and r.headers["Retry-After"] for r in refused)
    assert all("max_waiting=2" in r.json()["error"]["message"] for r in refused)
    assert len(served) >= 3
    assert all(r.json()["usage"]["completion_tokens"] == 24 for r in served)


def test_a_more_urgent_request_displaces_the_newest_of_the_least_urgent(tls):
    """Every slot busy and the 2-request queue full: a request of higher priority is queued in
    place of the newest waiting one of the lowest priority, which ends 429 (HTTP) or
    RESOURCE_EXHAUSTED (gRPC) saying so; one no more urgent than any waiting one is refused."""
    long = pb.SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    calls, http = [], {}
    try:
        for i in range(8):  # one at a time: eight at once can find the 2-request queue full
            calls.append(tls.stub.Generate(pb.GenerateRequest(text=f"Story {i}:", sampling=long)))
            wait_stats(tls, lambda s: s.num_running == i + 1)
        later = tls.stub.Generate(pb.GenerateRequest(text="Later:", sampling=long, priority=5))
        calls.append(later)
        wait_stats(tls, lambda s: s.num_waiting == 1)
        waiter = threading.Thread(target=lambda: http.update(response=tls.http.post(
            "/v1/completions", json={"prompt": "Later over HTTP:", "max_tokens": 400,
                                     "ignore_eos": True, "jaxgen": {"priority": 5}})))
        waiter.start()
        wait_stats(tls, lambda s: s.num_waiting == 2)
        urgent = tls.stub.Generate(pb.GenerateRequest(text="Urgent:", sampling=long, priority=0))
        calls.append(urgent)
        waiter.join(60)  # the newest of priority 5: displaced
        assert http["response"].status_code == 429
        assert "displaced" in http["response"].json()["error"]["message"]
        calls.append(tls.stub.Generate(pb.GenerateRequest(text="Urgent too:", sampling=long,
                                                          priority=-1)))
        with pytest.raises(grpc.RpcError) as err:  # then the other one of priority 5
            list(later)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "displaced" in err.value.details() and "max_waiting=2" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # as urgent as the least urgent waiting one
            list(tls.stub.Generate(pb.GenerateRequest(text="Same:", sampling=long, priority=0)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "displaced" not in err.value.details()
        wait_stats(tls, lambda s: s.num_displaced == 2 and s.num_waiting == 2)
    finally:
        for call in calls:
            call.cancel()
    wait_stats(tls, lambda s: s.num_running == s.num_waiting == 0)


def wait_stats(tls, condition, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while not condition(s := tls.stub.GetServerStats(pb.GetServerStatsRequest())):
        assert time.monotonic() < deadline, s
        time.sleep(0.05)


def test_a_killed_engine_process_is_replaced_and_serves_the_same_greedy_output(tls):
    """SIGKILL of the engine process: health NOT_SERVING and new calls refused as UNAVAILABLE
    (HTTP: 503 with Retry-After) while a new one starts from the same config, then SERVING
    with the same greedy output. (Then the SIGTERM test below stops the restarted engine.)"""
    pid = tls.server.engine_pid
    if pid is None:
        pytest.skip("the engine runs on a thread of the server: no process to kill")
    request = pb.GenerateRequest(text="The capital of France is", sampling=pb.SamplingParams(
        max_tokens=16, temperature=0))
    want = [t for c in tls.stub.Generate(request) for t in c.token_ids]
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    while tls.health.Check(health_pb2.HealthCheckRequest()).status != NOT_SERVING:
        assert time.monotonic() - start < 10, "health still SERVING with the engine killed"
        time.sleep(0.01)
    refused = tls.http.post("/v1/completions", json={"prompt": "during the restart"})
    with pytest.raises(grpc.RpcError) as err:
        list(tls.stub.Generate(pb.GenerateRequest(text="during the restart"), timeout=30))
    assert wait_gone(pid, 5)
    start = time.monotonic()
    while tls.health.Check(health_pb2.HealthCheckRequest()).status != SERVING:
        assert time.monotonic() - start < 240, tls.server.log[-3000:]
        time.sleep(0.05)
    assert [t for c in tls.stub.Generate(request) for t in c.token_ids] == want
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "restarting" in err.value.details()
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    assert "restarting" in refused.json()["error"]["message"]
    assert tls.server.engine_pid != pid and tls.stub.GetServerStats(
        pb.GetServerStatsRequest()).engine_restarts == 1


def test_sigterm_drains_in_flight_requests_then_exits_0(tls):
    """The last test of the shared server: it is gone afterwards."""
    results, first_chunk = [None] * 3, [threading.Event() for _ in range(3)]

    def stream(i):
        chunks = []
        call = tls.stub.Generate(pb.GenerateRequest(text=f"Story {i}:", sampling=pb.SamplingParams(
            max_tokens=96, temperature=0, ignore_eos=True)))
        try:
            for c in call:
                chunks.append(c)
                first_chunk[i].set()
            results[i] = chunks
        except grpc.RpcError as e:
            results[i] = e
            first_chunk[i].set()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for t, first in zip(threads, first_chunk):  # one at a time: three arriving together can
        t.start()  # find the 2-request waiting queue full before the loop admits any of them
        assert first.wait(60)
    os.kill(tls.server.proc.pid, signal.SIGTERM)
    start = time.monotonic()
    while tls.health.Check(health_pb2.HealthCheckRequest()).status != NOT_SERVING:
        assert time.monotonic() - start < 5, "health still SERVING after SIGTERM"
        time.sleep(0.02)
    with pytest.raises(grpc.RpcError) as err:
        list(tls.stub.Generate(pb.GenerateRequest(text="late")))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    for t in threads:
        t.join(120)
    for chunks in results:  # in flight at SIGTERM: finished in full
        assert not isinstance(chunks, Exception), chunks
        assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert chunks[-1].usage.completion_tokens == 96
    assert tls.server.proc.wait(60) == 0
    log = tls.server.log
    assert "draining 3 in-flight request(s)" in log and log.rstrip().endswith("jaxgen: stopped")
    # The engine process ended by its own exit: the server never had to kill it.
    assert "killing it" not in log and "did not stop" not in log, log[-2000:]
    if tls.server.engine_pid is not None:  # stopped by the server, not left behind
        assert wait_gone(tls.server.engine_pid, 5)


@pytest.mark.parametrize("mode", ENGINE_MODES)
def test_sigterm_during_warm_up_exits_0_promptly(tmp_path, cache_dir, mode):
    model = ensure_model(cache_dir)
    # A fresh compilation cache: warm-up really compiles, so the signal lands inside XLA.
    server = ServerProcess([*FLAGS, "--model", model, *engine_mode_flags(mode)], tmp_path / "server.log", cache_dir,
                           str(tmp_path / "xla"))
    try:
        server.wait_listening()
        deadline = time.monotonic() + 60
        while "loaded from" not in server.log:  # loaded: warm-up has begun
            assert time.monotonic() < deadline and server.proc.poll() is None, server.log
            time.sleep(0.05)
        time.sleep(0.5)
        children = child_pids(server.proc.pid)  # with --engine-process: it is warming up
        assert children if mode == "process" else True
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0, server.log
        assert server.log.rstrip().endswith("jaxgen: stopped") and "serving" not in server.log
        assert all(wait_gone(pid) for pid in children)  # the engine process did not outlive it
    finally:
        server.stop()
