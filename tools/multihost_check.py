"""Greedy output of a real model over a group of processes against one process, for `jaxgen
generate`, `jaxgen batch` and `jaxgen serve` (gRPC, streams arriving staggered): the multi-host
acceptance matrix of docs/multi-host.md, run by hand (minutes per cell on the CPU box; CI runs a
few small cases in tests/test_multihost.py).

    python tools/multihost_check.py --model smollm2-135m --groups 2:1,4 2:2,2 2:4,1 4:2,4 \\
        --commands generate,batch,serve

Each group is `tools/launch_group.py -n N --cpu-devices 2`; the reference is one process with
one host device. Prints one row per (command, group): exit status, identical or not, seconds.
Exits 1 if any cell differs or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from launch_group import free_port  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "Dear friend,",
           "1, 2, 3, 4,", "The weather today"]
ENGINE = ["--slots", "4", "--max-model-len", "128", "--num-pages", "64", "--decode-steps", "4",
          "--max-prefill-tokens", "16"]
START_TIMEOUT_S = 900.0  # a group of real-model processes compiling on two shared cores
RUN_TIMEOUT_S = 1800.0


def env_for(devices: int | None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def launcher(n: int | None) -> list[str]:
    """The head of a command: one process, or a group of n."""
    if not n:
        return [sys.executable, "-m", "jaxgen.cli"]
    return [sys.executable, str(ROOT / "tools" / "launch_group.py"), "-n", str(n),
            "--cpu-devices", "2", "--", sys.executable, "-m", "jaxgen.cli"]


def mesh_flags(mesh: str | None) -> list[str]:
    return ["--mesh", mesh] if mesh else []


def run_generate(common, n, mesh, work: Path, max_tokens: int) -> tuple[int, list]:
    run = subprocess.run([*launcher(n), "generate", *common, *mesh_flags(mesh), "--json",
                          "--max-tokens", str(max_tokens), *PROMPTS], capture_output=True,
                         text=True, env=env_for(None if n else 1), timeout=RUN_TIMEOUT_S)
    (work / "generate.log").write_text(run.stderr)
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return run.returncode, [line["token_ids"] for line in lines]


def run_batch(common, n, mesh, work: Path, max_tokens: int) -> tuple[int, list]:
    source, out = work / "in.jsonl", work / "out.jsonl"
    source.write_text("".join(json.dumps({
        "custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
        "body": {"prompt": p, "max_tokens": max_tokens, "temperature": 0}}) + "\n"
        for i, p in enumerate(PROMPTS)))
    out.unlink(missing_ok=True)
    run = subprocess.run([*launcher(n), "batch", str(source), str(out), "--quiet", *common,
                          *mesh_flags(mesh)], capture_output=True, text=True,
                         env=env_for(None if n else 1), timeout=RUN_TIMEOUT_S)
    (work / "batch.log").write_text(run.stdout + run.stderr)
    if run.returncode or not out.exists():
        return run.returncode or 1, []
    texts = {r["custom_id"]: r["response"]["body"]["choices"][0]["text"]
             for r in map(json.loads, out.read_text().splitlines())}
    return 0, [texts.get(f"r{i}") for i in range(len(PROMPTS))]


def run_serve(common, n, mesh, work: Path, max_tokens: int) -> tuple[int, list]:
    """Serves over gRPC, streams every prompt with arrivals 0.2 s apart, then SIGTERM: the
    greedy token ids of each stream and the group's exit status (0 only if it drained)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from jaxgen.v1 import generation_pb2 as pb
    from jaxgen.v1 import generation_pb2_grpc as pb_grpc

    port = free_port()
    log = open(work / "serve.log", "w")
    proc = subprocess.Popen([*launcher(n), "serve", "--port", str(port), *common,
                             *mesh_flags(mesh)], stdout=log, stderr=subprocess.STDOUT,
                            env=env_for(None if n else 1), start_new_session=True)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                return proc.returncode or 1, []
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"not SERVING within {START_TIMEOUT_S:g}s: {work}/serve.log")
            time.sleep(1)
        stub = pb_grpc.GenerationStub(channel)
        results: list = [None] * len(PROMPTS)

        def one(i: int) -> None:
            time.sleep(0.2 * i)  # staggered: later streams join a batch already decoding
            request = pb.GenerateRequest(text=PROMPTS[i], sampling=pb.SamplingParams(
                max_tokens=max_tokens, temperature=0.0))
            results[i] = [t for r in stub.Generate(request, timeout=RUN_TIMEOUT_S)
                          for t in r.token_ids]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(RUN_TIMEOUT_S)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(120), results
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()


RUNNERS = {"generate": run_generate, "batch": run_batch, "serve": run_serve}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--groups", nargs="+", default=["2:1,4", "2:2,2", "2:4,1", "4:2,4"],
                   metavar="N:D,M", help="process count and mesh of each group")
    p.add_argument("--commands", default="generate,batch,serve")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--work", default=None, help="where logs go (default: a temporary folder)")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="multihost-check-"))
    cache = work / "xla-cache"  # one compilation cache for the reference and every group
    common = ["--model", args.model, *ENGINE, "--compilation-cache-dir", str(cache)]
    commands = args.commands.split(",")
    print(f"# {args.model}, greedy, {len(PROMPTS)} prompts x {args.max_tokens} tokens; logs in "
          f"{work}\n\n| command | processes | mesh | exit | output | seconds |\n|---|---|---|---|---|---|",
          flush=True)
    bad = 0
    for command in commands:
        ref_dir = work / command / "one"
        ref_dir.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        rc, want = RUNNERS[command](common, None, None, ref_dir, args.max_tokens)
        print(f"| {command} | 1 | - | {rc} | reference ({sum(w is not None for w in want)} "
              f"outputs) | {time.monotonic() - start:.0f} |", flush=True)
        bad += bool(rc or len(want) != len(PROMPTS))
        for group in args.groups:
            n, mesh = group.split(":")
            cell = work / command / f"{n}-{mesh}"
            cell.mkdir(parents=True, exist_ok=True)
            start = time.monotonic()
            try:
                rc, got = RUNNERS[command](common, int(n), mesh, cell, args.max_tokens)
                same = "identical" if got == want and want else "DIFFERENT"
            except Exception as e:  # a cell that fails is reported, the others still run
                rc, same = "-", f"failed: {type(e).__name__}: {e}"
            bad += bool(rc or same != "identical")
            print(f"| {command} | {n} | {mesh} | {rc} | {same} | "
                  f"{time.monotonic() - start:.0f} |", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
