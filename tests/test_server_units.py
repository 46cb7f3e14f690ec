"""The server's parts without a real model: generated stubs are fresh, the engine never imports
grpc, config and presets, proto <-> engine mapping, the asyncio bridge, `jaxgen serve` /
`jaxgen client` user errors, and an in-process server over a tiny random engine whose device
fails (health NOT_SERVING)."""

from __future__ import annotations

import asyncio
import filecmp
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxgen.config import ServerConfig
from jaxgen.request_stream import RequestOutput, RequestStream
from jaxgen.scheduler import TokenLogprobs, Usage
from jaxgen.server import request_mapping as rm
from jaxgen.server.stream_bridge import outputs, waker
from jaxgen.v1 import generation_pb2 as pb
from jaxgen.v1 import generation_pb2_grpc as pb_grpc
from tests.server_process import ROOT, child_env

sys.path.insert(0, str(ROOT / "tools"))
import gen_protos  # noqa: E402


def test_committed_stubs_equal_freshly_generated_ones(tmp_path):
    written = gen_protos.generate(tmp_path)
    committed = ROOT / "jaxgen" / "v1"
    assert sorted(p.name for p in written) == sorted(
        p.name for p in committed.iterdir() if p.is_file()), "stubs added or removed"
    stale = [p.name for p in written if not filecmp.cmp(p, committed / p.name, shallow=False)]
    assert not stale, f"stale stubs {stale}: run `python tools/gen_protos.py` and commit"


def test_the_engine_path_never_imports_grpc():
    code = ("import sys, jaxgen.engine, jaxgen.build, jaxgen.runtime, jaxgen.models, jaxgen.cli; "
            "jaxgen.cli.parser(); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'grpc' "
            "or m.startswith(('jaxgen.v1', 'jaxgen.server.servicer', 'jaxgen.server.lifecycle'))); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=child_env())


def test_serving_without_metrics_never_imports_prometheus():
    code = ("import sys, jaxgen.request_log, jaxgen.server.lifecycle; "
            "assert 'prometheus_client' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=child_env())


@pytest.mark.parametrize("reason, detail, outcome", [
    (None, "", None), ("stop", "stop string '\\n'", "ok"), ("length", "", "ok"),
    ("abort", "deadline exceeded (0.010s past)", "deadline_exceeded"), ("abort", "aborted", "aborted"),
    ("abort", "shed: waited 3.0s in the queue, over max_queue_time=2s", "shed"),
    ("error", "out of device memory", "error"),
    ("error", "engine unavailable: the engine process exited (killed by SIGKILL)", "unavailable")])
def test_outcome_of_a_final_output(reason, detail, outcome):
    """One outcome serves the metrics label, the request log and the servicer's status code."""
    assert RequestOutput("r", (), "", finish_reason=reason, detail=detail).outcome == outcome


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxgen.cli", *args], capture_output=True,
                          text=True, env=child_env(), cwd=ROOT, timeout=120)


def test_serve_and_client_user_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"slotz": 8}')
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    for run, status, message in [
        (run_cli("serve", "--port", str(busy.getsockname()[1])), 2, "cannot listen on 127.0.0.1:"),
        (run_cli("serve", "--config", str(bad)), 2, "unknown setting 'slotz'"),
        (run_cli("serve", "--tls-cert", "cert.pem"), 2, "TLS needs both a certificate and a key"),
        (run_cli("serve", "--tls-cert", "no.pem", "--tls-key", "no.key"), 2, "no.pem: no such file"),
        (run_cli("client", "Hi", "--port", str(_closed_port()), "--timeout", "5"), 1, "UNAVAILABLE"),
    ]:
        assert run.returncode == status, run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("jaxgen: error:") and message in lines[0], run.stderr
    busy.close()


@pytest.mark.parametrize("engine_process", [False, True])
def test_serve_with_a_missing_model_ends_with_one_error_line(tmp_path, engine_process):
    """Found while loading (in the engine process with --engine-process): exit status 2, the
    error in one line, no traceback."""
    run = run_cli("serve", "--port", "0", "--model", str(tmp_path / "none.gguf"),
                  "--engine-process" if engine_process else "--no-engine-process")
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("jaxgen: error: model ") and "none.gguf" in last


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- proto <-> engine ---------------------------------------------------------------------------

def test_sampling_params_defaults_and_priority():
    params = rm.sampling_params(pb.SamplingParams(), priority=-5, prompt_len=10, max_context=64)
    assert params.max_tokens == 54 and params.priority == -5  # the rest of the context
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.logprobs is None
    params = rm.sampling_params(pb.SamplingParams(max_tokens=3, temperature=0, logprobs=0,
                                                  stop=["x"], stop_token_ids=[7]), 0, 10, 64)
    assert (params.max_tokens, params.greedy, params.logprobs, params.stop, params.stop_token_ids) == \
        (3, True, 0, ("x",), (7,))


def test_response_carries_tokens_logprobs_finish_and_usage():
    lp = TokenLogprobs(5, -0.25, ((5, -0.25), (9, -2.0)))
    out = RequestOutput("r", (5,), "hi", (lp,), "length", "max_tokens=1 reached",
                        Usage(3, 1, 0, 0, 0.01, None))
    msg = rm.response(out)
    assert (msg.request_id, msg.text, list(msg.token_ids)) == ("r", "hi", [5])
    assert msg.logprobs[0].token_id == 5 and [t.token_id for t in msg.logprobs[0].top] == [5, 9]
    assert msg.finish_reason == pb.FINISH_REASON_LENGTH and msg.finish_detail == "max_tokens=1 reached"
    assert msg.usage.prompt_tokens == 3 and msg.usage.HasField("queue_time_s")
    assert not msg.usage.HasField("time_to_first_token_s")
    assert rm.response(RequestOutput("r", (1, 2), "ab")).finish_reason == pb.FINISH_REASON_UNSPECIFIED


def test_trace_chunks_split_files_and_mark_the_last_piece(tmp_path):
    from jaxgen.profiling import trace_chunks

    (tmp_path / "plugins" / "profile").mkdir(parents=True)
    files = {"empty": b"", "plugins/profile/exact": b"abcdefgh", "plugins/profile/ragged": b"0123456789"}
    for rel, data in files.items():
        (tmp_path / rel).write_bytes(data)
    chunks = list(trace_chunks(str(tmp_path), 4))
    assert [(rel, offset, last) for rel, offset, _, last in chunks] == [
        ("empty", 0, True), ("plugins/profile/exact", 0, False), ("plugins/profile/exact", 4, True),
        ("plugins/profile/ragged", 0, False), ("plugins/profile/ragged", 4, False),
        ("plugins/profile/ragged", 8, True)]
    assert {rel: b"".join(d for r, _, d, _ in chunks if r == rel) for rel in files} == files


# -- the asyncio bridge -------------------------------------------------------------------------

def test_many_streams_are_bridged_without_a_thread_each():
    streams = [RequestStream(f"r{i}") for i in range(64)]
    streams[0].put(RequestOutput("r0", (0,), "early"))  # before anyone listens

    def produce():
        for k in range(1, 4):
            for s in streams:
                s.put(RequestOutput(s.request_id, (k,), str(k)))
            time.sleep(0.01)
        for s in streams:
            s.put(RequestOutput(s.request_id, (), "", finish_reason="stop"))

    async def main():
        tasks = [asyncio.ensure_future(_collect(s)) for s in streams]
        await asyncio.sleep(0.05)
        threads = threading.active_count()
        producer = threading.Thread(target=produce)
        producer.start()
        results = await asyncio.gather(*tasks)
        producer.join()
        return threads, results

    threads_while_waiting, results = asyncio.run(main())
    assert threads_while_waiting == threading.active_count()  # no thread per stream
    assert results[0] == [(0,), (1,), (2,), (3,), ()]
    assert all(r == [(1,), (2,), (3,), ()] for r in results[1:])


def test_a_burst_of_outputs_wakes_the_loop_once():
    """An engine step puts an output on every running stream; while the loop is busy they all
    ride one `call_soon_threadsafe` (one self-pipe write, one loop handle), and every stream
    still gets its outputs. A failing wake-up callback does not starve the others."""
    streams = [RequestStream(f"r{i}") for i in range(64)]
    handoffs = []

    async def main():
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (handoffs.append(a), real(*a))[1]
        tasks = [asyncio.ensure_future(_collect(s)) for s in streams]
        await asyncio.sleep(0.05)  # every consumer registered its wake-up
        for k, final in ((1, None), (2, "stop")):
            before = len(handoffs)
            # The loop thread is blocked here (as when it is busy writing responses) while the
            # engine thread puts one output on each stream (after a wake-up that fails).
            producer = threading.Thread(target=lambda: (waker(loop).wake(lambda: 1 / 0), [
                s.put(RequestOutput(s.request_id, (k,), str(k), finish_reason=final))
                for s in streams]))
            producer.start()
            producer.join()
            assert len(handoffs) - before == 1
            await asyncio.sleep(0)
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert all(r == [(1,), (2,)] for r in results)


async def _collect(stream):
    return [out.token_ids async for out in outputs(stream)]


# -- an in-process server whose engine dies ------------------------------------------------------

class InProcessServer:
    def __init__(self, config, load):
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main(config, load)))
        self._thread.start()
        assert self._ready.wait(30)

    async def _main(self, config, load):
        from jaxgen.server.lifecycle import serve

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self.error = None

        def listening(port):
            self.port = port
            self._ready.set()
        try:
            await serve(config, load, self._stop, on_listening=listening)
        except Exception as e:
            self.error = e

    def wait_stopped(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def close(self):
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)


def test_engine_failure_turns_health_not_serving_and_stops_the_server_with_an_error(monkeypatch):
    """An engine on a thread cannot be restarted: once it is dead the server turns NOT_SERVING,
    drains and stops with EngineDeadError (`jaxgen serve` exits 1 for its orchestrator)."""
    from jaxgen.engine_api import EngineDeadError
    from jaxgen.models import Model
    from jaxgen.server.serving_model import ServingModel
    from tests.helpers import TINY_LLAMA, ByteTokenizer, engine_for

    model = Model(TINY_LLAMA)
    engine = engine_for(model, model.init_random(seed=3), ByteTokenizer(), warmup=True)
    engine.start()
    server = InProcessServer(ServerConfig(port=0, drain_timeout_s=5), lambda: ServingModel(engine))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health, stub = health_pb2_grpc.HealthStub(channel), pb_grpc.GenerationStub(channel)
            status = lambda: health.Check(health_pb2.HealthCheckRequest()).status  # noqa: E731
            deadline = time.monotonic() + 30
            while status() != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]),
                                         sampling=pb.SamplingParams(max_tokens=3, temperature=0))
            assert sum(len(c.token_ids) for c in stub.Generate(request)) >= 1

            def consume_and_fail(plan):
                for pages in engine.runner.kv_pages:
                    pages.delete()  # what a donated call that then fails leaves behind
                raise RuntimeError("out of device memory")

            monkeypatch.setattr(engine.runner, "launch", consume_and_fail)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request))
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert "out of device memory" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert server.wait_stopped(30), "the server kept running with a dead engine"
            assert isinstance(server.error, EngineDeadError)
            assert "out of device memory" in str(server.error)
    finally:
        server.close()


def test_profile_capture_switches_the_trace_inside_quiesce(tmp_path, monkeypatch):
    import contextlib

    import jax

    from jaxgen.profiling import ProfileCapture

    events, inside = [], []

    @contextlib.contextmanager
    def quiesce():
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    monkeypatch.setattr(jax.profiler, "start_trace",
                        lambda *a, **k: events.append(("start", bool(inside))))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: events.append(("stop", bool(inside))))
    out = ProfileCapture(str(tmp_path)).capture(0.05, quiesce)
    assert events == [("start", True), ("stop", True)] and out.startswith(str(tmp_path))
    events.clear()
    ProfileCapture(str(tmp_path)).capture(0.05)  # no engine to pause: still traces
    assert events == [("start", False), ("stop", False)]


def test_perfetto_copy_drops_the_metadata_and_is_written_once(tmp_path):
    import gzip
    import json

    from jaxgen.profiling import write_perfetto_traces

    run = tmp_path / "plugins" / "profile" / "2026_12_01"
    run.mkdir(parents=True)
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump({"metadata": {"x": 1}, "traceEvents": [{"name": "generate", "ph": "X"}]}, f)
    (tmp_path / "plugins" / "profile" / "broken").mkdir()
    (tmp_path / "plugins" / "profile" / "broken" / "h.trace.json.gz").write_bytes(b"not gzip")
    assert write_perfetto_traces(str(tmp_path)) == [str(run / "perfetto_trace.json.gz")]
    with gzip.open(run / "perfetto_trace.json.gz", "rt") as f:
        assert json.load(f) == {"traceEvents": [{"name": "generate", "ph": "X"}]}
    assert write_perfetto_traces(str(tmp_path)) == []  # already there
