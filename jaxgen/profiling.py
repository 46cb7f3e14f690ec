"""On-demand XLA profiler traces of a running server, of a given duration, into a server-side
directory. (JAX's profiler server, for TensorBoard / XProf to capture from, is started by
`jaxgen.server.lifecycle` with `jax.profiler.start_server`.)

The step functions carry named scopes (`prefill`, `insert`, `generate`, `sampling`) and the engine
marks host scheduling with trace annotations (`jaxgen.schedule`, `jaxgen.update`), so both show
up by name in a trace. Knows nothing about gRPC: the servicer's `CaptureProfile` calls `capture`.
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import json
import logging
import os
import threading
import time

import jax

MAX_PROFILE_SECONDS = 300.0
log = logging.getLogger(__name__)


class ProfileBusyError(RuntimeError):
    """A capture is already running (JAX allows one trace at a time)."""


class ProfileCapture:
    """Captures traces into timestamped subdirectories of `root`, one at a time."""

    def __init__(self, root: str):
        self.root = root
        self._busy = threading.Lock()

    def capture(self, duration_s: float, quiesce=None) -> str:
        """Traces everything the process does for `duration_s` (blocking); returns the run's
        directory. Raises ValueError for a bad duration, ProfileBusyError while another runs.

        `quiesce` (e.g. `Engine.quiesced`): a context manager under which the trace starts and
        stops, so the profiler (CUPTI on GPU) is switched on and off while no device step is
        in flight. On an H200 a trace started and stopped under load once left the CUDA context
        poisoned (`CUDA_ERROR_LAUNCH_FAILED` in every later step; cf. jax-ml/jax#40260). The
        pause lasts the switch and JAX's own export; the Perfetto copy is written after it."""
        quiet = quiesce if quiesce is not None else contextlib.nullcontext
        if not 0 < duration_s <= MAX_PROFILE_SECONDS:
            raise ValueError(f"duration_s={duration_s}: must be in (0, {MAX_PROFILE_SECONDS:g}]")
        if not self._busy.acquire(blocking=False):
            raise ProfileBusyError("a profile capture is already running; retry when it ends")
        try:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
            out = os.path.join(self.root, f"profile-{stamp}")
            os.makedirs(out, exist_ok=True)
            with quiet():
                jax.profiler.start_trace(out)
            try:
                time.sleep(duration_s)
            finally:
                with quiet():
                    jax.profiler.stop_trace()  # writes the XSpace and trace.json.gz
            write_perfetto_traces(out)
            return out
        finally:
            self._busy.release()


def write_perfetto_traces(run_dir: str) -> list[str]:
    """Next to every `*.trace.json.gz` under `run_dir` without one, a `perfetto_trace.json.gz`:
    the same trace without its `metadata` field, which ui.perfetto.dev refuses. Returns the
    files written; a trace that cannot be converted is logged and skipped (the capture keeps
    its XSpace and trace.json.gz)."""
    written = []
    for base, _, names in os.walk(run_dir):
        target = os.path.join(base, "perfetto_trace.json.gz")
        traces = sorted(n for n in names if n.endswith(".trace.json.gz"))
        if not traces or os.path.exists(target):
            continue
        source = os.path.join(base, traces[0])  # one host per capture directory here
        try:
            with gzip.open(source, "rb") as f:
                trace = json.load(f)
            trace.pop("metadata", None)
            with gzip.open(target, "wb") as f:
                f.write(json.dumps(trace).encode())
            written.append(target)
        except (OSError, ValueError) as e:
            log.warning("no Perfetto copy of %s: %s", source, e)
    return written


def trace_chunks(directory: str, chunk_bytes: int):
    """(path relative to `directory` with "/" separators, offset, data, last) for every file under
    `directory`, sorted by path, each file in pieces of at most `chunk_bytes` (an empty one in one
    empty piece); `last` marks a file's final piece."""
    found = []
    for base, _, names in os.walk(directory):
        found += [os.path.relpath(os.path.join(base, n), directory) for n in names]
    for rel in sorted(found):
        path = os.path.join(directory, rel)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            for offset in range(0, max(size, 1), chunk_bytes):
                yield (rel.replace(os.sep, "/"), offset, f.read(chunk_bytes),
                       offset + chunk_bytes >= size)
