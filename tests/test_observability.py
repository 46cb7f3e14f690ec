"""Observability against a real `jaxgen serve` process (the small model and flags of
test_server): /metrics adds up during and after a small load, a profiler trace captured through
`jaxgen profile` names the step scopes and host annotations, the per-request log lines, and
tools/bench_serving.py's report for a few seconds of load."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from jaxgen.v1 import generation_pb2 as pb
from jaxgen.v1 import generation_pb2_grpc as pb_grpc
from tests.server_process import (ENGINE_MODES, ROOT, ServerProcess, child_env, engine_flags,
                                  engine_mode_flags, ensure_model)

NUM_PAGES = 256


class Observed:
    def __init__(self, server: ServerProcess):
        self.server = server
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        self.stub = pb_grpc.GenerationStub(self.channel)
        found = re.search(r"metrics on (http://[^\s]+)", server.log)
        assert found, server.log[-2000:]
        self.metrics_url = found.group(1)

    def scrape(self) -> dict[str, float]:
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def generate(self, text: str, max_tokens: int, **kw) -> list:
        req = pb.GenerateRequest(text=text, sampling=pb.SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True), **kw)
        return list(self.stub.Generate(req, timeout=120))


@pytest.fixture(scope="module", params=ENGINE_MODES)
def observed(request, tmp_path_factory, cache_dir, xla_cache_dir):
    """With the engine on a thread of the server and in its own process (whose step counters,
    scheduler counters and traces reach /metrics and `jaxgen profile` through the server)."""
    ensure_model(cache_dir)
    work = tmp_path_factory.mktemp("observed")
    server = ServerProcess([*engine_flags(cache_dir), *engine_mode_flags(request.param), "--metrics-port",
                            "0", "--profile-dir", str(work / "profiles")], work / "server.log",
                           cache_dir, xla_cache_dir)
    try:
        server.wait_listening()
        obs = Observed.__new__(Observed)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        server.wait_serving(channel)
        channel.close()
        obs.__init__(server)
        yield obs
        obs.channel.close()
    finally:
        server.stop()


def test_metrics_add_up_during_and_after_load(observed):
    before = observed.scrape()
    assert before["jaxgen_kv_pages_free"] == NUM_PAGES - 1 or before["jaxgen_kv_pages_free"] > 0
    lengths = [3 + i % 5 for i in range(12)]
    during = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            during.append(observed.scrape())

    poller = threading.Thread(target=poll)
    poller.start()
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: observed.generate(f"Count to {i}:", lengths[i]), range(12)))
    # One request cancelled mid-way: counted as aborted.
    call = observed.stub.Generate(pb.GenerateRequest(text="Long story:", sampling=pb.SamplingParams(
        max_tokens=400, temperature=0.0, ignore_eos=True)), timeout=120)
    next(call)
    call.cancel()
    stop.set()
    poller.join()
    deadline = time.monotonic() + 30  # the abort lands once the steps in flight are read
    while time.monotonic() < deadline:
        after = observed.scrape()
        if after.get('jaxgen_requests_total{finish_reason="abort",outcome="aborted"}', 0) >= 1:
            break
    prompt_tokens = sum(r[-1].usage.prompt_tokens for r in results)
    completion = sum(r[-1].usage.completion_tokens for r in results)
    assert completion == sum(lengths)

    def grew(name):
        return after.get(name, 0) - before.get(name, 0)

    assert grew('jaxgen_requests_total{finish_reason="length",outcome="ok"}') == 12
    assert grew('jaxgen_requests_total{finish_reason="abort",outcome="aborted"}') == 1
    assert grew("jaxgen_prompt_tokens_total") >= prompt_tokens  # + the cancelled one's prompt
    assert grew("jaxgen_generation_tokens_total") >= completion
    assert grew("jaxgen_e2e_request_latency_seconds_count") == 13
    assert grew("jaxgen_time_to_first_token_seconds_count") == 13
    assert grew("jaxgen_engine_step_seconds_count") > 0
    assert grew("jaxgen_host_gap_seconds_count") > 0
    # Decode steps are launched ahead; some of them may find the device drained, never more.
    assert grew("jaxgen_steps_launched_ahead_total") > 0
    assert 0 <= grew("jaxgen_steps_launched_on_drained_device_total") <= \
        grew("jaxgen_steps_launched_ahead_total")
    assert grew("jaxgen_prefix_cache_query_tokens_total") > 0  # full pages of the prompts
    assert max(d["jaxgen_requests_running"] for d in during) >= 1
    assert max(d["jaxgen_kv_pages_used"] for d in during) >= 1
    # After the load every page is back: used 0, free = the pool (less the null page).
    assert after["jaxgen_requests_running"] == 0 and after["jaxgen_requests_waiting"] == 0
    assert after["jaxgen_kv_pages_used"] == 0 and after["jaxgen_slots_used"] == 0
    assert after["jaxgen_kv_pages_free"] == before["jaxgen_kv_pages_free"]
    assert after["jaxgen_compilations_after_warmup_total"] == 0
    log = observed.server.log
    assert "startup model=" in log and "compile_s=" in log
    lines = [l for l in log.splitlines() if "request id=" in l]
    assert len(lines) >= 13
    assert all("prompt=" not in l for l in lines)  # no prompt text unless --log-prompts
    assert any("outcome=aborted" in l for l in lines)
    assert all("completion_tokens=" in l and "e2e_s=" in l for l in lines)


def test_profile_capture_names_steps_and_host_scheduling(observed, tmp_path):
    load = threading.Thread(target=lambda: [observed.generate(f"Trace {i}:", 12) for i in range(6)])
    cli = subprocess.Popen([sys.executable, "-m", "jaxgen.cli", "profile", "--server",
                            f"127.0.0.1:{observed.server.port}", "--duration", "2.5", "--out",
                            str(tmp_path)], env=child_env(), cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    load.start()
    out, err = cli.communicate(timeout=120)
    load.join()
    assert cli.returncode == 0, err
    files = [Path(p) for p in out.split()]
    assert files and all(f.is_file() for f in files)
    blob = b"".join(gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
                    for f in files)
    for name in (b"prefill", b"insert", b"generate", b"sampling", b"jaxgen.schedule",
                 b"jaxgen.update"):
        assert name in blob, name


def test_profile_rejects_a_bad_duration(observed):
    with pytest.raises(grpc.RpcError) as e:
        list(observed.stub.CaptureProfile(pb.CaptureProfileRequest(duration_s=0), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "duration_s=0" in e.value.details()


def test_bench_serving_report(observed, tmp_path):
    report_path, png = tmp_path / "report.json", tmp_path / "report.png"
    # --max-seconds bounds each run; a run ends as soon as its requests do (a 2-core CI box is slow).
    proc = subprocess.run(
        [sys.executable, "tools/bench_serving.py", "--port", str(observed.server.port),
         "--api", "both", "--http-port", str(observed.server.http_port), "--server-pid",
         str(observed.server.proc.pid),
         "--rates", "4", "--concurrency", "2", "--num-requests", "6", "--max-seconds", "40",
         "--max-prompt-tokens", "48", "--max-output-tokens", "16", "--out-json", str(report_path),
         "--out-png", str(png)], env=child_env(), cwd=ROOT, capture_output=True, text=True,
        timeout=240)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert png.stat().st_size > 1000
    assert [("rate" in r, "concurrency" in r, r["api"]) for r in report["runs"]] == [
        (True, False, "grpc"), (True, False, "openai"), (False, True, "grpc"), (False, True, "openai")]
    for run in report["runs"]:
        assert run["chunks"] >= run["completed"] and run["front_end_cpu_us_per_chunk"] > 0
        assert run["requests"] >= 1 and run["completed"] + sum(run["errors"].values()) == run["requests"]
        assert run["request_throughput"] > 0 and run["output_token_throughput"] > 0, (run, proc.stdout)
        for key in ("ttft_s", "tpot_s", "e2e_s"):
            assert set(run[key]) == {"p50", "p90", "p99"}
        assert run["ttft_s"]["p50"] <= run["e2e_s"]["p50"]
    bad = subprocess.run([sys.executable, "tools/bench_serving.py", "--host", "10.0.0.1",
                          "--rates", "1"], env=child_env(), cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "host='10.0.0.1': loopback only" in bad.stderr
