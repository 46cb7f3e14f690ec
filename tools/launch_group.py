"""Starts one jaxgen command as a group of N processes on this machine (docs/multi-host.md):
process i gets JAXGEN_COORDINATOR_ADDRESS, JAXGEN_NUM_PROCESSES=N and JAXGEN_PROCESS_ID=i, and
its own devices (`--cpu-devices K`: K host devices per process; `--gpus-per-process K`: GPUs
i*K .. i*K+K-1 via CUDA_VISIBLE_DEVICES).

    python tools/launch_group.py -n 2 --cpu-devices 2 -- \\
        jaxgen generate --mesh 1,4 --model smollm2-135m "The capital of France is"
    python tools/launch_group.py -n 2 --gpus-per-process 1 -- jaxgen serve --mesh 1,2

Process 0's output comes through as it is; the others' lines are prefixed `[i]` (or written to
`--log-dir`). SIGINT / SIGTERM go to process 0 only: it leads every stop (it drains, then stops
the others). Exits once every process has, with process 0's status, else the first non-zero
one; processes still running `--kill-after` seconds after the first exit are killed.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_env(rank: int, num_processes: int, coordinator: str, cpu_devices: int | None = None,
                gpus_per_process: int | None = None, base: dict | None = None) -> dict:
    """The environment of process `rank` of the group."""
    env = dict(os.environ if base is None else base)
    env.update(JAXGEN_COORDINATOR_ADDRESS=coordinator, JAXGEN_NUM_PROCESSES=str(num_processes),
               JAXGEN_PROCESS_ID=str(rank))
    if cpu_devices:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={cpu_devices}"])
    if gpus_per_process:
        first = rank * gpus_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + g) for g in range(gpus_per_process))
    return env


def _relay(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, b""):
        out.write(f"{prefix}{line.decode(errors='replace')}")
        out.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--num-processes", type=int, required=True)
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="process 0's coordination address (default: 127.0.0.1 and a free port)")
    p.add_argument("--cpu-devices", type=int, default=None, metavar="K",
                   help="host (CPU) devices per process")
    p.add_argument("--gpus-per-process", type=int, default=None, metavar="K")
    p.add_argument("--log-dir", default=None, help="write process i's output to DIR/process-i.log")
    p.add_argument("--kill-after", type=float, default=120.0, metavar="SECONDS",
                   help="after the first process exits, kill those still running this late")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command of every process")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command after --")
    if command[0] == "jaxgen":  # the jaxgen of this interpreter, installed or not
        command = [sys.executable, "-m", "jaxgen.cli", *command[1:]]
    coordinator = args.coordinator or f"127.0.0.1:{free_port()}"
    procs, relays = [], []
    for rank in range(args.num_processes):
        env = process_env(rank, args.num_processes, coordinator, args.cpu_devices,
                          args.gpus_per_process)
        if rank == 0:
            out = None
        elif args.log_dir:
            os.makedirs(args.log_dir, exist_ok=True)
            out = open(os.path.join(args.log_dir, f"process-{rank}.log"), "wb")
        else:
            out = subprocess.PIPE
        # A session of its own: a terminal's Ctrl-C reaches this launcher only, which passes it
        # to process 0.
        procs.append(subprocess.Popen(command, env=env, stdout=out, start_new_session=True,
                                      stderr=subprocess.STDOUT if out is not None else None))
        if out is subprocess.PIPE:
            relays.append(threading.Thread(target=_relay, args=(procs[-1].stdout, f"[{rank}] ",
                                                                sys.stderr), daemon=True))
            relays[-1].start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: procs[0].send_signal(signum))
    first_exit = None
    while any(proc.poll() is None for proc in procs):
        if first_exit is None and any(proc.poll() is not None for proc in procs):
            first_exit = time.monotonic()
        if first_exit is not None and time.monotonic() - first_exit > args.kill_after:
            for rank, proc in enumerate(procs):
                if proc.poll() is None:
                    print(f"launch_group: killing process {rank} ({args.kill_after:g}s after "
                          "the first exit)", file=sys.stderr)
                    proc.kill()
        time.sleep(0.1)
    for relay in relays:
        relay.join(1)
    codes = [proc.returncode for proc in procs]
    return codes[0] or next((c for c in codes if c), 0)


if __name__ == "__main__":
    sys.exit(main())
