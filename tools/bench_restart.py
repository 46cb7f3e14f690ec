"""Time to SERVING after the engine process is killed, on a `jaxgen serve` this tool starts.

    python tools/bench_restart.py [--kills 3] [--streams 16] [--out-json r.json] [-- SERVE FLAGS]

Starts `jaxgen serve --port 0 --http-port 0 SERVE FLAGS` (default model: Gemma 3 270M, the
default caches, so a second run measures warm caches as a restarted server sees them), waits for
SERVING and records a greedy completion. Then `--kills` times: starts `--streams` streamed
requests, SIGKILLs the engine process once one of them has output, and measures the time from
the kill to health SERVING again; checks the greedy completion is unchanged and counts the
streams that ended ok (kept, or done before the kill) and UNAVAILABLE (had output). Prints one
table, with the load and warm-up times of each engine process from the server's log; SIGTERM at
the end, expecting exit 0. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxgen.v1 import generation_pb2 as pb
from jaxgen.v1 import generation_pb2_grpc as pb_grpc

START_TIMEOUT_S = 1800
SERVING = health_pb2.HealthCheckResponse.SERVING


class Server:
    def __init__(self, flags):
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="jaxgen-serve-", suffix=".log",
                                                    delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jaxgen.cli", "serve", "--port", "0", "--http-port", "0",
             *flags], stdout=self.log_file, stderr=subprocess.STDOUT)
        self.port = int(self.wait_for(r"listening on [^\s]+:(\d+) ").group(1))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def log(self) -> str:
        with open(self.log_file.name) as f:
            return f.read()

    def wait_for(self, pattern: str):
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log)
            if found:
                return found
            if self.proc.poll() is not None:
                sys.exit(f"jaxgen serve exited with {self.proc.returncode}:\n{self.log[-3000:]}")
            time.sleep(0.05)
        sys.exit(f"no {pattern!r} in the server's log within {START_TIMEOUT_S}s")

    def wait_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.health.Check(health_pb2.HealthCheckRequest(), timeout=10).status != SERVING:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                sys.exit(f"not SERVING:\n{self.log[-3000:]}")
            time.sleep(0.02)

    def engine_pid(self) -> int:
        pids = re.findall(r"engine=process pid=(\d+)|restarted in [\d.]+s \(pid (\d+)\)", self.log)
        if not pids:
            sys.exit("the engine runs on a thread of the server (--no-engine-process?): nothing to kill")
        return int(next(p for p in reversed(pids[-1]) if p))


def greedy(server: Server) -> list[int]:
    request = pb.GenerateRequest(text="The capital of France is", sampling=pb.SamplingParams(
        max_tokens=24, temperature=0))
    return [t for r in server.stub.Generate(request, timeout=600) for t in r.token_ids]


def killed_round(server: Server, streams: int) -> dict:
    pid, started = server.engine_pid(), threading.Event()

    def one(i):
        request = pb.GenerateRequest(text=f"Write about topic number {i}:", sampling=pb.SamplingParams(
            max_tokens=32, temperature=0))
        try:
            for response in server.stub.Generate(request, timeout=600):
                if response.token_ids:
                    started.set()
            return "ok"
        except grpc.RpcError as e:
            return e.code().name

    with ThreadPoolExecutor(streams) as pool:
        outcomes = [pool.submit(one, i) for i in range(streams)]
        if not started.wait(600):
            sys.exit("no stream produced output within 600s")
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        while server.health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING:
            if time.monotonic() - killed > 30:
                sys.exit("health still SERVING 30s after the engine process was killed")
            time.sleep(0.005)  # until the server has noticed
        server.wait_serving()
        seconds = time.monotonic() - killed
        ends = [f.result() for f in outcomes]
    return {"seconds_to_serving": round(seconds, 2), "ok": ends.count("ok"),
            "unavailable": ends.count("UNAVAILABLE"),
            "other": len(ends) - ends.count("ok") - ends.count("UNAVAILABLE")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--out-json", default=None)
    p.add_argument("serve_flags", nargs="*", help="after --: flags for jaxgen serve")
    args = p.parse_args()
    server = Server(args.serve_flags)
    try:
        start = time.monotonic()
        server.wait_serving()
        first_start = time.monotonic() - start
        want = greedy(server)
        rounds = []
        for _ in range(args.kills):
            rounds.append(killed_round(server, args.streams))
            rounds[-1]["greedy_exact"] = greedy(server) == want
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(120)
        log = server.log
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    loads = [float(s) for s in re.findall(r"loaded from \S+ in ([\d.]+)s", log)]
    warmups = [float(s) for s in re.findall(r"warm-up compiled in ([\d.]+)s", log)]
    model = re.search(r"startup model=(\S+) device='([^']+)'", log)
    print(f"model {model.group(1)} on {model.group(2)}; first start to SERVING {first_start:.1f}s "
          f"(load {loads[0]:.1f}s, warm-up {warmups[0]:.1f}s)")
    print("| kill | s to SERVING | engine load s | warm-up s | streams ok | UNAVAILABLE | other "
          "| greedy exact |")
    print("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rounds, 1):
        print(f"| {i} | {r['seconds_to_serving']:.1f} | {loads[i]:.1f} | {warmups[i]:.1f} | "
              f"{r['ok']} | {r['unavailable']} | {r['other']} | {r['greedy_exact']} |")
    print(f"SIGTERM: exit {code}")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump({"first_start_s": first_start, "rounds": rounds, "loads_s": loads,
                       "warmups_s": warmups, "exit_code": code}, f, indent=2)
    ok = code == 0 and all(r["greedy_exact"] and not r["other"] for r in rounds)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
