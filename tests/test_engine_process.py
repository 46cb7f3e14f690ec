"""`jaxgen serve --engine-process`: the server process never starts a JAX backend of its own.
(What happens when the engine process dies or hangs runs in tests/test_chaos.py; the rest of the
server's behaviour with the engine in its own process in tests/test_server*.py and
tests/test_observability.py, parametrized over both engine modes.)"""

from __future__ import annotations

import json
import os
import signal

import grpc
import pytest

from jaxgen.v1 import generation_pb2 as pb
from jaxgen.v1 import generation_pb2_grpc as pb_grpc
from tests.server_process import (ENGINE_MODES, ROOT, ServerProcess, child_env, engine_flags,
                                  engine_mode_flags, ensure_model)

RECORD_BACKENDS = """
import atexit, json, os, sys

def _record():  # at a normal exit: whether this process ever started a JAX backend
    xb = sys.modules.get("jax._src.xla_bridge")
    # JAX's own exit hook (registered later, so run earlier) has cleared `_backends` by now;
    # the fork handler that starting a backend installs stays recorded.
    started = bool(getattr(xb, "_backends", None) or getattr(xb, "_at_fork_handler_installed", False))
    path = os.path.join(os.environ["JAXGEN_TEST_BACKENDS_DIR"], f"{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump(started, f)

atexit.register(_record)
"""


@pytest.mark.parametrize("mode", ENGINE_MODES)
def test_the_server_process_starts_no_jax_backend_of_its_own(mode, tmp_path, cache_dir,
                                                             xla_cache_dir):
    """With the engine in its own process the server process never starts a JAX backend, even
    while serving: on a GPU each process that does takes its own share of device memory (XLA
    preallocates 75% by default), which the engine process needs. An exit hook records each
    process's backend; the engine on a thread (the server's own backend) shows the hook works."""
    ensure_model(cache_dir)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(RECORD_BACKENDS)
    env = dict(child_env(), PYTHONPATH=f"{hook}{os.pathsep}{ROOT}",
               JAXGEN_TEST_BACKENDS_DIR=str(tmp_path))
    server = ServerProcess([*engine_flags(cache_dir), *engine_mode_flags(mode), "--metrics-port", "0"],
                           tmp_path / "server.log", cache_dir, xla_cache_dir, env=env)
    try:
        server.wait_listening()
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            server.wait_serving(channel)
            stub = pb_grpc.GenerationStub(channel)
            out = list(stub.Generate(pb.GenerateRequest(text="Hello", sampling=pb.SamplingParams(
                max_tokens=8, temperature=0.7, seed=1)), timeout=60))
            assert out[-1].finish_reason
            stub.Tokenize(pb.TokenizeRequest(text="Hello"), timeout=30)
            stub.GetServerStats(pb.GetServerStatsRequest(), timeout=30)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0
        assert "killing it" not in server.log and "did not stop" not in server.log
    finally:
        server.stop()
    started = json.loads((tmp_path / f"{server.proc.pid}.json").read_text())
    assert started == (mode == "thread"), server.log[-2000:]
