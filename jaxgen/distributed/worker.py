"""`Worker`: every process but 0 — it runs the plans process 0 sends on its own shards, and
decides nothing.

It never schedules, never reads sampled tokens, never looks at a clock to decide what to run:
each `StepPlan` arrives numbered from process 0 and is run in that order (a gap or a repeat is a
divergence). Three threads: the main one runs plans; a reader takes every frame off the
connection as it comes (so process 0's heartbeats are heard even while a step runs); a beat
thread reports progress (the last plan run, compilations after warm-up) and watches for silence.
Process 0 is lost when its connection closes or nothing comes from it for the peer timeout;
then this process exits with `GroupLostError.exit_status`, naming it. A failed step is reported
to process 0 (which stops the group) before this process exits the same way. `STOP` ends the
loop cleanly: the last steps finish, `STOPPED` goes back, and `serve` returns 0.

Knows the wire format, the group and the runner's `launch`; nothing of requests or text.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import socket
import sys
import threading
import time

import jax

from jaxgen.distributed import wire
from jaxgen.distributed.group import GroupError, ProcessGroup
from jaxgen.distributed.leader import ORDERLY_EXIT_WAIT_S, beat_interval
from jaxgen.engine_api import GroupLostError

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 2  # steps dispatched here and not yet finished (process 0 keeps as many)


class Worker:
    def __init__(self, group: ProcessGroup):
        assert not group.is_leader
        self.group = group
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._last_heard = time.monotonic()
        self._last_run = 0
        self._compilations = 0
        self._stopping = threading.Event()
        self._conn: wire.Connection | None = None

    def connect(self) -> None:
        """Connects to process 0 at the address it published, says who this is, and starts the
        reader and beat threads."""
        address = self.group.read("control")
        token = bytes.fromhex(self.group.read("token"))
        host, _, port = address.rpartition(":")
        try:
            sock = socket.create_connection((host, int(port)), self.group.start_timeout_s)
        except OSError as e:
            raise GroupError(f"{self.group.name}: cannot reach process 0's control port at "
                             f"{address}: {e}") from None
        sock.settimeout(self.group.peer_timeout_s)
        self._conn = wire.Connection(sock)
        self._conn.send(wire.HELLO, wire.hello_payload(self.group.process_id, token,
                                                       f"{socket.gethostname()} pid {os.getpid()}"))
        self._last_heard = time.monotonic()
        threading.Thread(target=self._read, name="jaxgen-leader-read", daemon=True).start()
        threading.Thread(target=self._beat, name="jaxgen-group-beat", daemon=True).start()

    def abandon(self) -> None:
        """Start-up failed here (the error is this process's to report): stop watching, so
        process 0 leaving is not a loss."""
        self._stopping.set()
        if self._conn is not None:
            self._conn.close()

    # -- the loop -----------------------------------------------------------------------------

    def serve(self, runner) -> int:
        """Runs process 0's plans until it says STOP (returns 0) or the group is lost (exits)."""
        expected = 1
        in_flight: collections.deque = collections.deque()
        while True:
            kind, payload = self._inbox.get()
            if kind == wire.PLAN:
                seq, plan = wire.read_plan(payload)
                if seq != expected:
                    self._fail(f"{self.group.name} diverged: it received step {seq} where step "
                               f"{expected} was due")
                try:
                    in_flight.append(runner.launch(plan))
                    while len(in_flight) > MAX_IN_FLIGHT:  # a failure on device surfaces here
                        _wait(in_flight.popleft())
                except Exception as e:
                    log.exception("step %d failed", seq)
                    self._fail(f"step {seq} failed on {self.group.name}: {type(e).__name__}: {e}")
                self._last_run, self._compilations = seq, runner.compilations_after_warmup
                expected += 1
            elif kind == wire.STOP:
                for launched in in_flight:
                    _wait(launched)
                self._stopping.set()
                self._conn.send(wire.STOPPED)
                print(f"jaxgen: {self.group.name} stopped by process 0 after {expected - 1} "
                      f"steps ({runner.compilations_after_warmup} compilations after warm-up)",
                      file=sys.stderr, flush=True)
                jax.distributed.shutdown()  # with process 0, in its barrier
                self._conn.close()
                return 0

    # -- threads ----------------------------------------------------------------------------------

    def _read(self) -> None:
        while True:
            try:
                kind, payload = self._conn.recv()
            except TimeoutError:
                continue
            except wire.ChannelClosed as e:
                # Process 0 failing to start says why and leaves: a moment for this one to
                # reach the same error (the agreement that failed) and stop in order.
                if self._stopping.wait(ORDERLY_EXIT_WAIT_S):
                    return
                self._exit(f"lost process 0 ({self.group.coordinator_address}): its connection "
                           f"closed ({e}): it exited or was killed")
            self._last_heard = time.monotonic()
            if kind == wire.LOST:  # now, even while the main thread is inside a step
                self._exit(f"the group failed: {payload.decode(errors='replace')}")
            if kind != wire.BEAT:
                self._inbox.put((kind, payload))
            if kind == wire.STOP:
                return

    def _beat(self) -> None:
        interval = beat_interval(self.group.peer_timeout_s)
        while not self._stopping.is_set():
            time.sleep(interval)
            if self._stopping.is_set():
                return
            silent = time.monotonic() - self._last_heard
            if silent > self.group.peer_timeout_s:
                self._exit(f"lost process 0 ({self.group.coordinator_address}): nothing heard "
                           f"from it for {silent:.1f}s (--peer-timeout "
                           f"{self.group.peer_timeout_s:g}s): it stopped, hung or was cut off")
            try:
                self._conn.send(wire.BEAT, wire.worker_beat_payload(self._last_run,
                                                                   self._compilations))
            except wire.ChannelClosed:
                pass  # the reader reports the closed connection

    # -- failing ----------------------------------------------------------------------------------

    def _fail(self, reason: str):
        """Tells process 0 (which stops the group), then exits."""
        try:
            self._conn.send(wire.FAILED, reason.encode(), wait_s=1.0)
        except wire.ChannelClosed:
            pass
        self._exit(reason)

    def _exit(self, reason: str):
        print(f"jaxgen: error: {self.group.name}: {reason}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(GroupLostError.exit_status)


def _wait(launched) -> None:
    jax.block_until_ready((launched.prefill, launched.decode, launched.verify))
