"""The control channel between process 0 and each other process of a group: one TCP connection
per process, length-prefixed frames, and the messages that travel on it.

Process 0 -> others: `PLAN` (the step's sequence number, then the pickled `StepPlan`), `BEAT`
(the sequence number of the last plan sent: a heartbeat while no plan goes out), `STOP` (a clean
stop: answer `STOPPED`, then leave), `LOST` (the group has failed; the text says why).
Others -> process 0: `HELLO` (rank and the group's token, first), `BEAT` (the last plan run and
the compilations after warm-up), `FAILED` (a step failed here; the text says how), `STOPPED`.

Process 0 never unpickles: what it reads is fixed binary fields and UTF-8 text, so a stranger
that reaches its port can at worst be refused. The others unpickle only what process 0 sends on
the connection they opened to the address the coordination service gave them.

A frame is `u32 length | u8 kind | payload`; `Connection` sends whole frames under a lock (plans
go out from the engine's thread, heartbeats from another) and reads them on one thread.
"""

from __future__ import annotations

import pickle
import socket
import struct
import threading

PLAN, BEAT, STOP, LOST, HELLO, FAILED, STOPPED = range(1, 8)
KIND_NAMES = {PLAN: "PLAN", BEAT: "BEAT", STOP: "STOP", LOST: "LOST", HELLO: "HELLO",
              FAILED: "FAILED", STOPPED: "STOPPED"}
_HEADER = struct.Struct("!IB")
_SEQ = struct.Struct("!Q")
_HELLO = struct.Struct("!I32s")  # rank, token (32 bytes)
_WORKER_BEAT = struct.Struct("!QI")  # last plan run, compilations after warm-up
MAX_FRAME = 64 * 1024 * 1024  # a plan is kilobytes; more is a stray or corrupt peer


class ChannelClosed(ConnectionError):
    """The other end closed the connection (or it broke)."""


class Connection:
    def __init__(self, sock: socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, kind: int, payload: bytes = b"", wait_s: float = -1) -> None:
        """One frame, whole. Raises ChannelClosed if the peer is gone or stops reading for the
        socket's timeout, or if another send holds the connection for more than `wait_s`
        (-1: as long as it takes)."""
        frame = _HEADER.pack(len(payload) + 1, kind) + payload
        if not self._send_lock.acquire(timeout=wait_s):
            raise ChannelClosed(f"another send has held the connection for {wait_s}s")
        try:
            self.sock.sendall(frame)
        except OSError as e:  # timeouts included: a peer that does not read is as good as gone
            raise ChannelClosed(f"send failed: {e}") from None
        finally:
            self._send_lock.release()

    def recv(self) -> tuple[int, bytes]:
        """The next frame as (kind, payload); blocks (up to the socket's timeout, then raises
        TimeoutError). Raises ChannelClosed at the end of the stream."""
        length, kind = _HEADER.unpack(self._exactly(_HEADER.size))
        if not 1 <= length <= MAX_FRAME:
            raise ChannelClosed(f"bad frame length {length}")
        return kind, self._exactly(length - 1)

    def _exactly(self, n: int) -> bytes:
        chunks, left = [], n
        while left:
            try:
                chunk = self.sock.recv(min(left, 1 << 20))
            except TimeoutError:
                raise
            except OSError as e:
                raise ChannelClosed(f"receive failed: {e}") from None
            if not chunk:
                raise ChannelClosed("connection closed")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# -- payloads -----------------------------------------------------------------------------------

def plan_payload(seq: int, plan) -> bytes:
    return _SEQ.pack(seq) + pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)


def read_plan(payload: bytes):
    (seq,) = _SEQ.unpack_from(payload)
    return seq, pickle.loads(payload[_SEQ.size:])


def seq_payload(seq: int) -> bytes:
    return _SEQ.pack(seq)


def read_seq(payload: bytes) -> int:
    return _SEQ.unpack(payload)[0]


def hello_payload(rank: int, token: bytes, about: str) -> bytes:
    return _HELLO.pack(rank, token) + about.encode()


def read_hello(payload: bytes) -> tuple[int, bytes, str]:
    rank, token = _HELLO.unpack_from(payload)
    return rank, token, payload[_HELLO.size:].decode(errors="replace")


def worker_beat_payload(last_run: int, compilations: int) -> bytes:
    return _WORKER_BEAT.pack(last_run, compilations)


def read_worker_beat(payload: bytes) -> tuple[int, int]:
    return _WORKER_BEAT.unpack(payload)
