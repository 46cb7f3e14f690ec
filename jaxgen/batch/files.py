"""The files of a batch job: OpenAI Batch JSONL in, one output line per input line out.

Input is read twice, never held whole: a first pass collects every line's `custom_id` (refusing
duplicates up front, with their line numbers, since resume could not tell them apart) and a
second pass streams the lines to the engine. stdin is spooled to a temporary file first.

Output is append-only and durable: each record is one `os.write` of a whole line (so a kill
can tear at most the last line), fsynced at least once a second and at close. Resuming reads
the `custom_id`s already written, and drops a torn last line (it is redone).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator

FSYNC_INTERVAL_S = 1.0


class JobError(Exception):
    """The job cannot run as asked (exit status 1 unless said otherwise)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Line:
    number: int  # 1-based line number in INPUT
    text: str
    custom_id: str  # the line's, or "line-N" when it has none readable


def _custom_id(text: str, number: int) -> str:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return f"line-{number}"
    cid = value.get("custom_id") if isinstance(value, dict) else None
    return cid if isinstance(cid, str) and cid else f"line-{number}"


class BatchInput:
    """INPUT (a path, or "-" for stdin, spooled to a temporary file)."""

    def __init__(self, path: str):
        self._spool = None
        if path == "-":
            self._spool = tempfile.NamedTemporaryFile("w+b", prefix="jaxgen-batch-", suffix=".jsonl")
            shutil.copyfileobj(sys.stdin.buffer, self._spool)
            self._spool.flush()
            path = self._spool.name
        elif not os.path.isfile(path):
            raise JobError(f"input={path}: no such file", status=2)
        self.path = path

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()

    def lines(self) -> Iterator[Line]:
        """The non-blank lines, in order, with their custom ids."""
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for number, text in enumerate(f, 1):
                if text.strip():
                    yield Line(number, text, _custom_id(text, number))

    def check_unique(self) -> set[str]:
        """The lines' custom ids; JobError (status 2) naming every duplicated custom_id and its
        line numbers."""
        seen: dict[str, int] = {}
        dupes: dict[str, list[int]] = {}
        for line in self.lines():
            first = seen.setdefault(line.custom_id, line.number)
            if first != line.number:
                dupes.setdefault(line.custom_id, [first]).append(line.number)
        if dupes:
            shown = "; ".join(f"{cid!r} on lines {', '.join(map(str, nums))}"
                              for cid, nums in list(dupes.items())[:10])
            more = f" (and {len(dupes) - 10} more)" if len(dupes) > 10 else ""
            raise JobError(f"input: duplicate custom_id: {shown}{more}; each line needs its own "
                           f"custom_id (a resumed job finds its finished lines by it)", status=2)
        return set(seen)


class BatchOutput:
    """OUTPUT, opened for appending after reading what an earlier run finished."""

    def __init__(self, path: str):
        self.path = path
        self.done: set[str] = set()
        self._stdout = path == "-"
        if self._stdout:
            self._fd = sys.stdout.fileno()
        else:
            self._resume()
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._synced = time.monotonic()

    def _resume(self) -> None:
        """Reads the custom ids already written; truncates a torn last line."""
        if not os.path.exists(self.path):
            return
        good = 0  # bytes of whole, valid lines
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    record = json.loads(raw) if raw.endswith(b"\n") else None
                except json.JSONDecodeError:
                    record = None
                if record is None:
                    if f.read(1):  # not the last line: this file is not a batch output
                        raise JobError(f"output={self.path}: line {number} is not a whole JSON "
                                       f"record (only a torn last line is repaired)")
                    break
                cid = record.get("custom_id") if isinstance(record, dict) else None
                if not isinstance(cid, str):
                    raise JobError(f"output={self.path}: line {number} has no custom_id; "
                                   f"not the output of a batch job")
                self.done.add(cid)
                good += len(raw)
        if good != os.path.getsize(self.path):
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def write(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        view = memoryview(data)
        while view:  # one write for a regular file; a pipe may take it in pieces
            view = view[os.write(self._fd, view):]
        if time.monotonic() - self._synced >= FSYNC_INTERVAL_S:
            self.sync()

    def sync(self) -> None:
        if not self._stdout:
            os.fsync(self._fd)
        self._synced = time.monotonic()

    def close(self) -> None:
        self.sync()
        if not self._stdout:
            os.close(self._fd)
