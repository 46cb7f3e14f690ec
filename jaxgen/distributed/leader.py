"""`Leader`: process 0's end of a group — it sends every `StepPlan` to the other processes,
hears their heartbeats, and stops the whole group when one is lost.

Every plan process 0 runs goes out first, numbered (the others check the numbers on receipt).
A process is lost when its connection closes (it died), when nothing has come from it for the
peer timeout (stopped, hung, cut off), when it reports a failed step, or — once the engine is
warmed up (`steady`), so that no step compiles any more — when a plan sent that long ago is
still not run there (stuck in a collective, or diverged). Then, once: the hooks run (the engine
ends its requests UNAVAILABLE and turns dead, so health is NOT_SERVING), the others are told,
process 0 holds for `LOST_GRACE_S` so that health checks and streams see it, and exits with
`GroupLostError.exit_status`, naming the lost process. A clean stop (`close`) tells the others
to stop, waits for each to confirm, and leaves `jax.distributed` together with them.

Knows the wire format and the group; nothing of the engine beyond the hooks it is given.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable

from jaxgen.distributed import wire
from jaxgen.distributed.group import GroupError, ProcessGroup
from jaxgen.engine_api import GroupLostError

log = logging.getLogger(__name__)

LOST_GRACE_S = 2.0  # process 0 answers NOT_SERVING this long before it exits
MAX_BEAT_INTERVAL_S = 1.0
STEP_FAILURE_WAIT_S = 1.0
ABANDON_WAIT_S = 2.0
ORDERLY_EXIT_WAIT_S = 1.0  # a closed connection first waits this long for an orderly stop


def beat_interval(peer_timeout_s: float) -> float:
    """How often each side speaks when it has nothing else to say."""
    return min(MAX_BEAT_INTERVAL_S, peer_timeout_s / 5)


@dataclasses.dataclass
class _Peer:
    rank: int
    about: str  # host and pid, for messages
    conn: wire.Connection
    last_heard: float
    last_run: int = 0  # the last plan it reported run
    compilations: int = 0  # after warm-up, as it reported
    stopped: threading.Event = dataclasses.field(default_factory=threading.Event)


class Leader:
    def __init__(self, group: ProcessGroup):
        assert group.is_leader
        self.group = group
        self.lost: GroupLostError | None = None
        self._peers: dict[int, _Peer] = {}
        self._seq = 0
        self._sent: collections.deque[tuple[int, float]] = collections.deque()  # (seq, when)
        self._last_sent = time.monotonic()
        self._send_lock = threading.Lock()  # plans go out whole and in order
        self._lost_lock = threading.Lock()
        self._hooks: list[Callable[[GroupLostError], None]] = []
        self._closing = threading.Event()
        self._steady = False  # every program compiled: a slow step is a stuck one

    # -- start ------------------------------------------------------------------------------

    def start(self) -> None:
        """Listens on a free port, publishes it with a token in the coordination service, and
        accepts every other process (HELLO), then starts the heartbeat threads."""
        token = secrets.token_bytes(32)
        host = self.group.coordinator_address.rpartition(":")[0].strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server = socket.create_server(("", 0), family=family)
        self.group.publish("control", f"{host}:{server.getsockname()[1]}")
        self.group.publish("token", token.hex())
        deadline = time.monotonic() + self.group.start_timeout_s
        try:
            while len(self._peers) < self.group.num_processes - 1:
                server.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    sock, address = server.accept()
                except TimeoutError:
                    missing = sorted(set(range(1, self.group.num_processes)) - set(self._peers))
                    raise GroupError(f"process(es) {missing} did not connect to process 0 within "
                                     f"{self.group.start_timeout_s:g}s") from None
                self._admit(sock, address, token)
        finally:
            server.close()
        for peer in self._peers.values():
            threading.Thread(target=self._read, args=(peer,), name=f"jaxgen-peer-{peer.rank}",
                             daemon=True).start()
        threading.Thread(target=self._watch, name="jaxgen-group-watch", daemon=True).start()
        log.info("process 0: %d other process(es) connected", len(self._peers))

    def _admit(self, sock: socket.socket, address, token: bytes) -> None:
        sock.settimeout(self.group.peer_timeout_s)
        conn = wire.Connection(sock)
        try:
            kind, payload = conn.recv()
            rank, their_token, about = wire.read_hello(payload) if kind == wire.HELLO else (0, b"", "")
        except (OSError, ValueError, wire.ChannelClosed) as e:
            log.warning("refused a control connection from %s: %s", address, e)
            conn.close()
            return
        if not secrets.compare_digest(their_token, token) or not 0 < rank < self.group.num_processes \
                or rank in self._peers:
            log.warning("refused a control connection from %s (rank %d): not a process of this "
                        "group", address, rank)
            conn.close()
            return
        self._peers[rank] = _Peer(rank, about, conn, time.monotonic())

    # -- the engine's side ------------------------------------------------------------------------

    def on_lost(self, hook: Callable[[GroupLostError], None]) -> None:
        """Runs `hook(error)` once the group is lost, before process 0 exits."""
        self._hooks.append(hook)

    def send(self, plan) -> None:
        """Sends `plan` to every other process, numbered; before process 0 runs it."""
        if self.lost is not None:
            raise self.lost
        with self._send_lock:
            self._seq += 1
            payload = wire.plan_payload(self._seq, plan)
            for peer in self._peers.values():
                try:
                    peer.conn.send(wire.PLAN, payload)
                except wire.ChannelClosed as e:
                    self.fail(f"process {peer.rank} ({peer.about}) did not take step "
                              f"{self._seq}: {e}")
            self._last_sent = now = time.monotonic()
            self._sent.append((self._seq, now))

    def steady(self) -> None:
        """Every program is compiled (warm-up done) on every process: from now on a plan not
        run within the peer timeout means a stuck process. (Before, a step may compile for
        longer than that.)"""
        self._steady = True

    @property
    def sync_dispatch(self) -> bool:
        return self.group.sync_dispatch

    def step_failed(self, reason: str):
        """A step failed on process 0: the group stops (never returns). A process that died
        fails the step's collectives here at about the moment its connection closes, so its
        reader gets a moment to name it first."""
        deadline = time.monotonic() + STEP_FAILURE_WAIT_S
        while self.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.fail(reason)

    @property
    def worker_compilations(self) -> int:
        """Compilations after warm-up the other processes reported (process 0 counts its own)."""
        return sum(peer.compilations for peer in self._peers.values())

    def fail(self, reason: str):
        """Stops the group (see the module docstring); never returns. A second caller waits
        while the first one does it."""
        with self._lost_lock:
            first = self.lost is None
            if first:
                self.lost = GroupLostError(f"{reason}; every process of the group stops")
        if not first:
            threading.Event().wait()
        print(f"jaxgen: error: {self.lost}", file=sys.stderr, flush=True)
        for hook in self._hooks:
            try:
                hook(self.lost)
            except Exception:
                log.exception("a group-loss hook failed")
        text = str(self.lost).encode()
        for peer in self._peers.values():
            try:
                peer.conn.send(wire.LOST, text, wait_s=0.5)
            except (OSError, wire.ChannelClosed):
                pass
        time.sleep(LOST_GRACE_S)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(GroupLostError.exit_status)

    def abandon(self) -> None:
        """Start-up failed here (the error is this process's to report): stop watching, so
        the others leaving is not a loss, and close the connections. Process 0 stays a moment
        longer, until the others have seen that and gone (the coordination service ends with
        it, and with it their chance to say why they stop)."""
        self._closing.set()
        for peer in self._peers.values():
            peer.stopped.set()
            try:
                peer.conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        deadline = time.monotonic() + ABANDON_WAIT_S
        for peer in self._peers.values():
            try:
                peer.conn.sock.settimeout(max(0.01, deadline - time.monotonic()))
                while peer.conn.sock.recv(1 << 16):
                    pass
            except OSError:
                pass
            peer.conn.close()

    def close(self) -> None:
        """A clean stop: every other process is told to stop and confirms; then all leave
        `jax.distributed` together. A process that does not confirm within the peer timeout
        stops the group as lost."""
        if self.lost is not None or self._closing.is_set():
            return
        self._closing.set()
        with self._send_lock:
            for peer in self._peers.values():
                try:
                    peer.conn.send(wire.STOP)
                except wire.ChannelClosed as e:
                    self.fail(f"process {peer.rank} ({peer.about}) could not be told to stop: {e}")
        deadline = time.monotonic() + self.group.peer_timeout_s
        for peer in self._peers.values():
            if not peer.stopped.wait(max(0.0, deadline - time.monotonic())):
                self.fail(f"process {peer.rank} ({peer.about}) did not confirm the stop within "
                          f"{self.group.peer_timeout_s:g}s")
        import jax

        jax.distributed.shutdown()  # the others are in its barrier now
        for peer in self._peers.values():
            peer.conn.close()

    # -- threads ----------------------------------------------------------------------------------

    def _read(self, peer: _Peer) -> None:
        while True:
            try:
                kind, payload = peer.conn.recv()
            except TimeoutError:
                continue  # silence is the watcher's to judge
            except wire.ChannelClosed as e:
                # A process that fails to start says why and leaves: a moment for this one to
                # reach the same error (the agreement that failed) and stop in order.
                if self._closing.wait(ORDERLY_EXIT_WAIT_S) and peer.stopped.is_set():
                    return
                self.fail(f"lost process {peer.rank} ({peer.about}): its connection closed "
                          f"({e}): it exited or was killed")
            peer.last_heard = time.monotonic()
            if kind == wire.BEAT:
                peer.last_run, peer.compilations = wire.read_worker_beat(payload)
            elif kind == wire.FAILED:
                self.fail(f"process {peer.rank} ({peer.about}) failed: "
                          f"{payload.decode(errors='replace')}")
            elif kind == wire.STOPPED:
                peer.stopped.set()
                return

    def _watch(self) -> None:
        interval = beat_interval(self.group.peer_timeout_s)
        timeout = self.group.peer_timeout_s
        while not self._closing.is_set():
            time.sleep(interval)
            now = time.monotonic()
            if now - self._last_sent >= interval and self._send_lock.acquire(blocking=False):
                try:  # nothing went out lately: a heartbeat instead
                    for peer in self._peers.values():
                        peer.conn.send(wire.BEAT, wire.seq_payload(self._seq))
                except wire.ChannelClosed:
                    pass  # its reader reports the closed connection
                finally:
                    self._send_lock.release()
            if self._closing.is_set():
                return
            self._check(now, timeout)

    def _check(self, now: float, timeout: float) -> None:
        for peer in self._peers.values():
            if now - peer.last_heard > timeout:
                self.fail(f"lost process {peer.rank} ({peer.about}): nothing heard from it for "
                          f"{now - peer.last_heard:.1f}s (--peer-timeout {timeout:g}s): it "
                          "stopped, hung or was cut off")
        behind = min((peer.last_run for peer in self._peers.values()), default=self._seq)
        while self._sent and self._sent[0][0] <= behind:
            self._sent.popleft()
        if self._steady and self._sent and now - self._sent[0][1] > timeout:
            seq = self._sent[0][0]
            slow = [p for p in self._peers.values() if p.last_run < seq]
            self.fail(f"lost process {slow[0].rank} ({slow[0].about}): it has not run step "
                      f"{seq}, sent {now - self._sent[0][1]:.1f}s ago (--peer-timeout "
                      f"{timeout:g}s): it is stuck or diverged")
