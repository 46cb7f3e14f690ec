"""Test harness for the gRPC server: a real `jaxgen serve` process on loopback with a small model
cut from the bundled SmolLM2-135M, the offline engine's completions for the same requests (in a
process of its own, same flags and environment as the server), and a throw-away TLS
certificate."""

from __future__ import annotations

import collections
import datetime
import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
# The front-end tests' servers and engines run the first SMALL_LAYERS of SmolLM2's 30 layers (its
# real weights and tokenizer), served as SMALL_NAME: what they check -- a server's output equals
# the offline engine's on the same checkpoint, through every path of the front end -- needs no
# good model, and a step or a warm-up costs a fraction of the whole model's on the CPU box. The
# tests of the model itself (HF parity, real-model speculative decoding and multi-host) load the
# whole model.
SMALL_LAYERS = 4
SMALL_NAME = "smollm2-135m-small"
# Small shapes keep warm-up short on CPU; the offline reference uses the very same flags.
SHAPE_FLAGS = ("--slots", "8", "--max-model-len", "512", "--num-pages", "256", "--decode-steps", "4",
               "--max-prefill-tokens", "64")
START_TIMEOUT_S = 240
# Where `jaxgen serve` runs the engine: on a thread of the server, or in a process of its own.
ENGINE_MODES = ("thread", "process")


def engine_mode_flags(mode: str) -> tuple[str, ...]:
    return ("--engine-process",) if mode == "process" else ("--no-engine-process",)


def child_pids(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    """Whether process `pid` has exited (or is a zombie) within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def child_env() -> dict:
    """The environment of a server as a user starts it: one CPU device (no test XLA_FLAGS)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return dict(env, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


def small_model_path(cache_dir: str) -> str:
    from jaxgen.checkpoints import registry

    return os.path.join(registry.cache_dir(cache_dir), "models", f"{MODEL}-first{SMALL_LAYERS}")


def engine_flags(cache_dir: str) -> tuple[str, ...]:
    """`jaxgen serve` flags of the small model (made by `ensure_model`) and the test shapes."""
    return ("--model", small_model_path(cache_dir), "--served-model-name", SMALL_NAME, *SHAPE_FLAGS)


def ensure_model(cache_dir: str) -> str:
    """Converts the bundled model into `cache_dir` once, before the session's processes load it
    (each would otherwise wait for the first to convert it), and cuts the small model from it:
    the first SMALL_LAYERS layers, the embedding table, final norm and tokenizer. Returns the
    small model's path. The session's workers share `cache_dir`: a file lock makes one cut it."""
    import filelock

    from jaxgen import checkpoints
    from jaxgen.checkpoints import orbax_format
    from jaxgen.models import Model
    from jaxgen.tokenizer import load_tokenizer

    whole = checkpoints.ensure_converted(MODEL, cache_dir)
    path = small_model_path(cache_dir)
    with filelock.FileLock(path + ".lock", timeout=START_TIMEOUT_S):
        if orbax_format.is_jaxgen_checkpoint(path):
            return path
        config = orbax_format.read_config(whole)
        params = Model(config).canonical_params(orbax_format.restore(whole, Model(config)))
        params["layers"] = {i: params["layers"][i] for i in range(SMALL_LAYERS)}
        small = config.replace(num_layers=SMALL_LAYERS,
                               name=f"{config.name} (first {SMALL_LAYERS} layers)")
        orbax_format.save(path, small, params, load_tokenizer(os.path.join(whole, "tokenizer")))
    return path


class ServerProcess:
    """`python -m jaxgen.cli serve --port 0 --http-port 0 ...` with its output in a log file."""

    def __init__(self, args, log_path: Path, cache_dir: str, xla_cache_dir: str, env=None):
        self.log_path = log_path
        self._log = open(log_path, "w")
        http = [] if any(a in ("--no-http", "--http-port") for a in args) else ["--http-port", "0"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jaxgen.cli", "serve", "--port", "0", *http, "--cache-dir",
             cache_dir, "--compilation-cache-dir", xla_cache_dir, *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env or child_env(), cwd=ROOT)
        self.port: int | None = None
        self.http_port: int | None = None

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    @property
    def engine_pid(self) -> int | None:
        """The current engine process's pid in process mode (the default): the startup line's,
        or the last restarted one's; None with the engine on a thread."""
        pids = re.findall(r"engine=process pid=(\d+)|restarted in [\d.]+s \(pid (\d+)\)", self.log)
        return int(next(p for p in reversed(pids[-1]) if p)) if pids else None

    def wait_listening(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            log = self.log
            found = re.search(r"listening on [^\s]+:(\d+) ", log)
            if found:
                self.port = int(found.group(1))
                http = re.search(r"HTTP \(OpenAI API\) on https?://[^\s]+:(\d+)/v1", log)
                self.http_port = int(http.group(1)) if http else None
                return self.port
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"server did not listen within {START_TIMEOUT_S}s:\n{self.log[-3000:]}")

    def wait_serving(self, channel: grpc.Channel, on_poll=None) -> list[str]:
        """Polls health until SERVING; returns the statuses seen, in order (repeats dropped).
        `on_poll(status)` runs after each poll (to probe the server while it warms up)."""
        stub = health_pb2_grpc.HealthStub(channel)
        seen: list[str] = []
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(
                stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status)
            if not seen or seen[-1] != status:
                seen.append(status)
            if on_poll is not None:
                on_poll(status)
            if status == "SERVING":
                return seen
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"server not SERVING within {START_TIMEOUT_S}s:\n{self.log[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


OFFLINE = """
import json, sys
import dataclasses
from jaxgen.build import build_engine
from jaxgen.cli import parser
from jaxgen.config_sources import config_from_args
from jaxgen.sampling_params import SamplingParams
requests = json.load(open(sys.argv[1]))
args = parser().parse_args(["serve", "--cache-dir", sys.argv[2], "--compilation-cache-dir", sys.argv[3],
                            *sys.argv[4:]])
config = config_from_args(args, "serve")
engine = build_engine(dataclasses.replace(config, engine=dataclasses.replace(config.engine, warmup=False)))
tok = engine.tokenizer
prompts = [tok.encode_chat(r["messages"]) if "messages" in r else tok.encode(r["text"]) for r in requests]
params = [SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], stop=tuple(r.get("stop", ())))
          for r in requests]
out = [{"token_ids": list(c.token_ids), "text": c.text, "finish_reason": c.finish_reason,
        "prompt_tokens": c.usage.prompt_tokens} for c in engine.generate(prompts, params)]
json.dump(out, open(sys.argv[1] + ".out", "w"))
"""


class OfflineCompletions:
    """The offline engine (`Engine.generate`, greedy) on `requests`, computed in a separate
    process started now; `result()` waits for it. Each request: {"text": ...} or
    {"messages": [...]}, with "max_tokens" and optionally "stop"."""

    def __init__(self, requests: list[dict], work_dir: Path, cache_dir: str, xla_cache_dir: str):
        self._path = work_dir / "offline-requests.json"
        self._path.write_text(json.dumps(requests))
        self._proc = subprocess.Popen(
            [sys.executable, "-c", OFFLINE, str(self._path), cache_dir, xla_cache_dir,
             *engine_flags(cache_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=ROOT)
        self._result = None

    def result(self) -> list[dict]:
        if self._result is None:
            _, err = self._proc.communicate(timeout=START_TIMEOUT_S)
            assert self._proc.returncode == 0, err[-3000:]
            self._result = json.loads(Path(str(self._path) + ".out").read_text())
        return self._result


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                         "compression")), grpc.ClientCallDetails):
    pass


class BearerKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <key>` to every call of a channel (what a client library
    would do), so that tools such as the reflection database can be used unchanged."""

    def __init__(self, key: str):
        self._header = ("authorization", f"Bearer {key}")

    def _with_key(self, d):
        return _CallDetails(d.method, d.timeout, [*(d.metadata or ()), self._header],
                            d.credentials, d.wait_for_ready, getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_key(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_key(details), requests)


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost / 127.0.0.1 and its key, valid for a day: (cert, key) PEMs."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
