"""On-demand XLA profiler traces of a running server, of a given duration, into a server-side
directory. (JAX's profiler server, for TensorBoard / XProf to capture from, is started by
`jaxgen.server.lifecycle` with `jax.profiler.start_server`.)

The step functions carry named scopes (`prefill`, `insert`, `generate`, `sampling`) and the engine
marks host scheduling with trace annotations (`jaxgen.schedule`, `jaxgen.update`), so both show
up by name in a trace. Knows nothing about gRPC: the servicer's `CaptureProfile` calls `capture`.
"""

from __future__ import annotations

import datetime
import os
import threading
import time

import jax

MAX_PROFILE_SECONDS = 300.0


class ProfileBusyError(RuntimeError):
    """A capture is already running (JAX allows one trace at a time)."""


class ProfileCapture:
    """Captures traces into timestamped subdirectories of `root`, one at a time."""

    def __init__(self, root: str):
        self.root = root
        self._busy = threading.Lock()

    def capture(self, duration_s: float) -> str:
        """Traces everything the process does for `duration_s` (blocking); returns the run's
        directory. Raises ValueError for a bad duration, ProfileBusyError while another runs."""
        if not 0 < duration_s <= MAX_PROFILE_SECONDS:
            raise ValueError(f"duration_s={duration_s}: must be in (0, {MAX_PROFILE_SECONDS:g}]")
        if not self._busy.acquire(blocking=False):
            raise ProfileBusyError("a profile capture is already running; retry when it ends")
        try:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
            out = os.path.join(self.root, f"profile-{stamp}")
            os.makedirs(out, exist_ok=True)
            jax.profiler.start_trace(out, create_perfetto_trace=True)
            try:
                time.sleep(duration_s)
            finally:
                jax.profiler.stop_trace()
            return out
        finally:
            self._busy.release()


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
