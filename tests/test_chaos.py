"""Chaos against a real `jaxgen serve` process with the engine in its own process (tests/chaos.py):
tenants' prefix caches kept apart; clients that stop reading cut off while 32 others stream on
time; the engine process SIGKILLed under 64 gRPC streams five times in a row, then stopped
(SIGSTOP) under HTTP streams, then killed until the restart breaker opens.

After each failure: every stream ends (none hangs) — ok with exactly the greedy tokens of a clean
run, or UNAVAILABLE / a 503-style error event only if it had streamed output (what had not is
kept and runs on the new engine) —, health is SERVING again, greedy output is exact, and no slot
or page is held once the streams are done. The step watchdog notices the stopped process; past
--max-engine-restarts the server stays NOT_SERVING and exits 1; /metrics counts every failure
and restart by cause.

The tests run in file order on one server (each restart is one more within the breaker's
window; the last test ends the server); each also runs alone."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from jaxgen.v1 import generation_pb2 as pb
from tests.chaos import (KEYS, LONG, NOT_SERVING, REQUESTS, SERVING, STREAM_TIMEOUT_S, Chaos,
                         http_stream, unread_http_stream)
from tests.server_process import ServerProcess, engine_flags, ensure_model, wait_gone

KILLS = 5
MAX_RESTARTS = KILLS + 1  # the five SIGKILLs and the SIGSTOP
STEP_TIMEOUT_S = 10  # far above a step on the loaded CPU box; the heartbeat comes every 1s
STALL_TIMEOUT_S = 4


@pytest.fixture(scope="module")
def chaos(tmp_path_factory, cache_dir, xla_cache_dir):
    ensure_model(cache_dir)
    work = tmp_path_factory.mktemp("chaos")
    server = ServerProcess([*engine_flags(cache_dir), "--engine-process", "--metrics-port", "0",
                            "--api-key", KEYS[0], "--api-key", KEYS[1],
                            "--step-timeout", str(STEP_TIMEOUT_S),
                            "--max-engine-restarts", str(MAX_RESTARTS),
                            "--stream-stall-timeout", str(STALL_TIMEOUT_S)],
                           work / "server.log", cache_dir, xla_cache_dir)
    try:
        server.wait_listening()
        server.wait_serving(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        yield Chaos(server)
    finally:
        server.stop()


def test_two_api_keys_share_no_prefix_pages_and_each_hits_its_own(chaos):
    """With API keys the prefix cache is scoped per key by default: the same prompt from another
    key finds none of the first key's pages (a cache hit would tell it what the first key sent);
    a key still hits its own pages, and a cache_salt narrows the scope further (gRPC and HTTP)."""
    text = "You are a careful assistant. " * 6 + "Summarise the plot of a novel about the sea."

    def cached(key: str, salt: str = "") -> int:
        responses = list(chaos.stub_for(key).Generate(pb.GenerateRequest(
            text=text, cache_salt=salt, sampling=pb.SamplingParams(max_tokens=2, temperature=0)),
            timeout=60))
        return responses[-1].usage.cached_prompt_tokens

    def cached_http(key: str, salt: str) -> int:
        import httpx2 as httpx

        r = httpx.post(chaos.http + "/v1/completions", timeout=60, headers={
            "Authorization": f"Bearer {key}"}, json={"prompt": text, "max_tokens": 2,
                                                     "temperature": 0, "cache_salt": salt})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(KEYS[0]) == 0
    assert cached(KEYS[1]) == 0  # the same prompt, another tenant: no page shared
    own = cached(KEYS[0])
    assert own >= 32 and cached(KEYS[1]) == own  # each hits its own pages
    assert cached(KEYS[0], salt="project-x") == 0  # a salt is a scope of its own ...
    assert cached_http(KEYS[0], "project-x") == own  # ... over gRPC and HTTP alike
    assert cached_http(KEYS[1], "project-x") == 0  # and stays within its key


def test_a_grpc_client_that_reads_nothing_is_cut_off_and_32_others_stream_on_time(chaos):
    """A client with a small flow-control window that never reads: its window fills, the
    server's writes to it wait, and after --stream-stall-timeout its request is aborted (slot
    and pages freed) while 32 other streams run exactly as in a clean run and as fast."""
    start = time.monotonic()
    chaos.run(REQUESTS[:32])
    clean_seconds = time.monotonic() - start
    stuck = chaos.stub_for(KEYS[0], **{"grpc.http2.bdp_probe": 0, "grpc.http2.lookahead_bytes":
                                       1024}).Generate(pb.GenerateRequest(
                                           text="Tell me a long story.", sampling=LONG),
                                           timeout=STREAM_TIMEOUT_S)
    start = time.monotonic()
    results = chaos.run(REQUESTS[:32])
    seconds = time.monotonic() - start
    assert [ended.tokens for ended in results] == chaos.reference[:32]
    assert seconds < 2 * clean_seconds + 10, (seconds, clean_seconds)
    chaos.wait_idle(STALL_TIMEOUT_S + 30)  # the unread request no longer holds its slot
    tokens = []
    with pytest.raises(grpc.RpcError) as err:
        for response in stuck:  # now read: what was sent before the cut, then the status
            tokens += response.token_ids
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"stream_stall_timeout={STALL_TIMEOUT_S}s" in err.value.details()
    assert len(tokens) < LONG.max_tokens


def test_an_http_client_that_reads_nothing_is_cut_off(chaos):
    cut = "read nothing for stream_stall_timeout"
    before = chaos.server.log.count(cut)
    sock = unread_http_stream(chaos)
    try:
        start = time.monotonic()
        while chaos.server.log.count(cut) == before:
            assert time.monotonic() - start < STALL_TIMEOUT_S + 120, chaos.server.log[-2000:]
            time.sleep(0.1)
        chaos.wait_idle()
        sock.settimeout(10)
        received = b""
        while chunk := sock.recv(1 << 16):
            received += chunk
            if len(received) > 1 << 22:
                break
    except TimeoutError:
        pass  # the connection is left for uvicorn to close: what was sent, and no more
    finally:
        sock.close()
    assert received.startswith(b"HTTP/1.1 200") and b"data: [DONE]" not in received


def test_sigkill_under_64_streams_five_times_in_a_row(chaos):
    before = chaos.scrape()
    restarts, unavailable = chaos.stats().engine_restarts, 0
    for _ in range(KILLS):
        unavailable += chaos.check_round(*chaos.run_killed())
    after = chaos.scrape()

    def grew(name):
        return after.get(name, 0) - before.get(name, 0)

    assert chaos.stats().engine_restarts == restarts + KILLS
    assert grew("jaxgen_engine_restarts_total") == KILLS
    assert grew('jaxgen_engine_failures_total{cause="killed"}') == KILLS
    assert grew("jaxgen_engine_restart_seconds_count") == KILLS
    assert grew('jaxgen_requests_total{finish_reason="error",outcome="unavailable"}') == unavailable


def test_a_stopped_engine_process_is_restarted_by_the_watchdog(chaos):
    """SIGSTOP: the process neither exits nor answers; the server hears no heartbeat for
    --step-timeout, kills it and starts another. HTTP streams this time: those with output end
    with OpenAI's error event (code engine_unavailable), the others complete exactly."""
    pid, started = chaos.engine_pid(), threading.Event()
    with ThreadPoolExecutor(16) as pool:
        clean = list(pool.map(lambda i: http_stream(chaos, i, threading.Event()), range(16)))
        assert all(error is None for _, error in clean)
        futures = [pool.submit(http_stream, chaos, i, started) for i in range(16)]
        assert started.wait(60)
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        assert wait_gone(pid, STEP_TIMEOUT_S + 60), "the stopped process was never replaced"
        noticed = time.monotonic() - stopped
        results = [f.result(timeout=STREAM_TIMEOUT_S) for f in futures]
    # Silence counts from the last heartbeat, up to a second before the stop.
    assert STEP_TIMEOUT_S - 1.5 <= noticed < STEP_TIMEOUT_S + 30
    failed = [(text, error) for text, error in results if error is not None]
    assert failed and len(failed) < len(results)
    for (text, error), (want, _) in zip(results, clean):
        if error is None:
            assert text == want
        else:
            assert error["code"] == "engine_unavailable" and "hung" in error["message"]
            assert text and want.startswith(text)
    chaos.wait_status(SERVING)
    assert chaos.scrape().get('jaxgen_engine_failures_total{cause="hung"}') == 1
    chaos.wait_idle()


def test_the_restart_breaker_opens_past_the_limit_and_the_server_exits_1(chaos):
    while chaos.stats().engine_restarts < MAX_RESTARTS:  # alone: use up the restarts first
        pid = chaos.engine_pid()
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid, 30)
        chaos.wait_status(NOT_SERVING, 30)
        chaos.wait_status(SERVING)
    results, _, _ = chaos.run_killed()  # one failure too many
    for ended in results:
        assert ended.code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), ended
    assert any(ended.code == grpc.StatusCode.UNAVAILABLE for ended in results)
    assert chaos.server.proc.wait(60) == 1
    log = chaos.server.log
    assert "not restarting it" in log and f"--max-engine-restarts={MAX_RESTARTS}" in log
    assert "jaxgen: error: the engine has failed" in log
