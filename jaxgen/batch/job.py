"""A batch job: OpenAI Batch lines through an in-process engine, a record per line appended as
each finishes (or in input order), resumable, bounded in memory, interruptible.

One thread does it all, as `Engine.generate` does: it parses lines, keeps a bounded window of
them in the engine (so requests are fed as slots free up, never the whole file), steps the
engine, and writes records as the engine finishes them (an observer hands over finished request
ids). No loop thread: nothing competes with the engine's host work for the GIL. Bodies are what the HTTP
API would answer (jaxgen.openai_api), so a line's record equals the HTTP response to its body.
SIGINT / SIGTERM stop admitting, give the lines in flight `drain_timeout_s` to finish, and leave
a file that resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import signal
import sys
import threading
import time
import uuid

from jaxgen.batch.files import BatchInput, BatchOutput, Line
from jaxgen.batch.progress import Progress
from jaxgen.engine_api import EngineObserver, QueueFullError, RequestError, add_choices
from jaxgen.openai_api.requests import ENDPOINTS, OpenAIError, parse
from jaxgen.openai_api.responses import Responder
from jaxgen.sampling_params import cache_salt

log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class BatchOptions:
    order: str = "completion"  # "completion": records as lines finish; "input": in input order
    drain_timeout_s: float = 30.0  # on SIGINT / SIGTERM: how long lines in flight may finish
    window: int | None = None  # lines in the engine at once; None: 2 x the engine's slots
    quiet: bool = False
    summary_json: str | None = None

    def __post_init__(self):
        if self.order not in ("completion", "input"):
            raise ValueError(f"order={self.order!r}: must be 'completion' or 'input'")
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout={self.drain_timeout_s}: must be >= 0")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window={self.window}: must be >= 1")


@dataclasses.dataclass
class Summary:
    lines: int = 0  # in INPUT
    ok: int = 0  # written this run with status 200
    failed: int = 0  # written this run with an error
    skipped: int = 0  # already in OUTPUT from an earlier run
    left: int = 0  # not done (interrupted): a rerun does them
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0
    output_tok_s: float = 0.0
    prefix_cache_hit_rate: float = 0.0  # of the prompt tokens looked up during the job

    @property
    def complete(self) -> bool:
        return self.left == 0


@dataclasses.dataclass
class _Entry:
    seq: int  # position among this run's lines (input order)
    line: Line
    streams: list = dataclasses.field(default_factory=list)
    responder: Responder | None = None
    open: int = 0  # streams not finished yet


class _Finished(EngineObserver):
    """Hands the ids of finished requests to the job's thread (runs on the engine thread)."""

    def __init__(self):
        self.ids: queue.SimpleQueue[str] = queue.SimpleQueue()

    def on_finish(self, finished) -> None:
        self.ids.put(finished.output.request_id)


def _record(line: Line, response=None, error=None) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id,
            "response": response, "error": error}


def _line_error(line: Line, message: str) -> dict:
    return _record(line, error={"code": "invalid_request", "message": f"line {line.number}: {message}"})


def _error_response(line: Line, e: OpenAIError, request_id: str) -> dict:
    return _record(line, {"status_code": e.status, "request_id": request_id, "body": e.body()})


class Job:
    def __init__(self, engine, inp: BatchInput, out: BatchOutput, options: BatchOptions):
        self.engine, self.inp, self.out, self.options = engine, inp, out, options
        info = engine.info()
        self.info = info
        # The window in lines; within the engine's queue bound, so adds are not refused.
        self.window = min(options.window or 2 * info.num_slots, info.max_waiting + info.num_slots)
        self.finished = _Finished()
        engine.observers.append(self.finished)
        self.entries: dict[str, _Entry] = {}  # engine request id -> its line's entry
        self.in_flight: dict[int, _Entry] = {}  # seq -> entry
        self.ready: dict[int, dict] = {}  # input order: seq -> record waiting for earlier ones
        self.next_write = 0
        self.summary = Summary()
        self.stopping = threading.Event()

    # -- the loop -----------------------------------------------------------------------------

    def run(self, total: int, progress: Progress) -> Summary:
        """Feeds lines while the window has room, steps the engine, writes what finished."""
        s = self.summary
        s.lines = total
        before = self.engine.stats()
        start = time.perf_counter()
        lines = self._lines_to_do()
        seq, exhausted, deadline = 0, False, None
        while True:
            while not exhausted and not self.stopping.is_set() and self._room(seq):
                line = next(lines, None)
                if line is None:
                    exhausted = True
                    break
                self._start(_Entry(seq, line), progress)
                seq += 1
            if not self.in_flight:
                if exhausted or self.stopping.is_set():
                    break
                continue
            if self.stopping.is_set() and deadline is None:
                deadline = time.monotonic() + self.options.drain_timeout_s
                log.warning("stopping: %d line(s) in flight get %gs to finish",
                            len(self.in_flight), self.options.drain_timeout_s)
            if deadline is not None and time.monotonic() >= deadline:
                self._abort_in_flight(progress)
                break
            if not self.engine.step() and not self.engine.has_work():
                raise RuntimeError("the engine has unfinished requests but nothing to schedule")
            self._collect(progress)
        s.left = s.lines - s.skipped - s.ok - s.failed
        s.wall_s = time.perf_counter() - start
        s.output_tok_s = s.output_tokens / s.wall_s if s.wall_s else 0.0
        after = self.engine.stats()
        queried = after.prefix_cache_query_tokens - before.prefix_cache_query_tokens
        hits = after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens
        s.prefix_cache_hit_rate = hits / queried if queried else 0.0
        return s

    def _lines_to_do(self):
        for line in self.inp.lines():
            if line.custom_id in self.out.done:
                self.summary.skipped += 1
            else:
                yield line

    def _room(self, seq: int) -> bool:
        """Whether line `seq` may enter the engine now: the window bounds the lines in flight,
        and in input order also the early finishers held for the lines before them."""
        if len(self.in_flight) >= self.window:
            return False
        return self.options.order != "input" or seq < self.next_write + self.window

    def _abort_in_flight(self, progress: Progress) -> None:
        """Past the drain timeout: the lines in flight end without records (a rerun does them);
        their requests leave the engine (each abort takes a step or two)."""
        for entry in self.in_flight.values():
            for stream in entry.streams:
                self.engine.abort(stream.request_id)
        for _ in range(100):
            if not self.in_flight:
                break
            self.engine.step()
            self._collect(progress)

    def _start(self, entry: _Entry, progress: Progress) -> None:
        line = entry.line
        try:
            request = json.loads(line.text)
        except (json.JSONDecodeError, RecursionError) as e:
            return self._done(entry, _line_error(line, f"not valid JSON: {e}"), progress)
        problem = _check_envelope(request)
        if problem:
            return self._done(entry, _line_error(line, problem), progress)
        model, plan = ENDPOINTS[request["url"]]
        responder_id = f"batch-{uuid.uuid4().hex}"
        try:
            body = dict(request["body"])
            if body.get("stream"):
                raise OpenAIError(400, "stream=true: a batch job writes whole responses", "stream")
            req = parse(model, body)
            # A batch job is one tenant: its prefix cache is global, narrowed by a cache_salt.
            gen = plan(req, self.engine.tokenizer, self.info).salted(
                cache_salt("global", None, req.cache_salt or ""))
            entry.responder = Responder(gen, self.info.name, self.engine.tokenizer, responder_id)
            self.in_flight[entry.seq] = entry
            for p, prompt in enumerate(gen.prompts):
                choices = gen.choices[p * gen.n:(p + 1) * gen.n]
                ids = [f"{responder_id}-{c.index}" for c in choices]
                for request_id in ids:
                    self.entries[request_id] = entry
                entry.open += len(ids)
                entry.streams += self._add(prompt, [c.params for c in choices], ids)
        except (OpenAIError, RequestError) as e:
            error = e if isinstance(e, OpenAIError) else OpenAIError(400, str(e))
            self._forget(entry)
            self._done(entry, _error_response(line, error, responder_id), progress)

    def _add(self, prompt, params, ids):
        """`add_choices`, stepping the engine while its queue is full (the window keeps it
        from filling, unless a line asks for many choices). A line of more choices than the
        queue holds could never enter: refused (all of a line's choices are queued at once)."""
        if len(params) > self.info.max_waiting:
            raise OpenAIError(400, f"n={len(params)}: more choices than this job's queue holds "
                                   f"(max_waiting={self.info.max_waiting})", "n")
        while True:
            try:
                return add_choices(self.engine, prompt, params, ids)
            except QueueFullError:
                self.engine.step()

    def _forget(self, entry: _Entry) -> None:
        for stream in entry.streams:
            self.engine.abort(stream.request_id)
        for request_id in [k for k, v in self.entries.items() if v is entry]:
            del self.entries[request_id]
        self.in_flight.pop(entry.seq, None)

    def _collect(self, progress: Progress) -> None:
        """Writes the records of the lines whose requests the last step finished."""
        try:
            request_id = self.finished.ids.get_nowait()
        except queue.Empty:
            progress.tick(self.summary)
            return
        while True:
            entry = self.entries.pop(request_id, None)
            if entry is not None:
                entry.open -= 1
                if entry.open == 0:
                    self._finish(entry, progress)
            try:
                request_id = self.finished.ids.get_nowait()
            except queue.Empty:
                return

    def _finish(self, entry: _Entry, progress: Progress) -> None:
        self.in_flight.pop(entry.seq, None)
        completions = [stream.result() for stream in entry.streams]
        if any(c.finish_reason == "abort" for c in completions):
            return  # stopped by the drain timeout: no record, a rerun does the line
        try:
            body = entry.responder.body(completions)
        except OpenAIError as e:
            return self._done(entry, _error_response(entry.line, e, entry.responder.id), progress)
        self._done(entry, _record(entry.line, {"status_code": 200,
                                               "request_id": entry.responder.id, "body": body}),
                   progress)

    def _done(self, entry: _Entry, record: dict, progress: Progress) -> None:
        if self.options.order == "completion":
            self._write(record, progress)
        else:  # input order: at most `window` early finishers wait here
            self.ready[entry.seq] = record
            while self.next_write in self.ready:
                self._write(self.ready.pop(self.next_write), progress)
                self.next_write += 1

    def _write(self, record: dict, progress: Progress) -> None:
        self.out.write(record)
        s, response = self.summary, record["response"]
        if response is not None and response["status_code"] == 200:
            s.ok += 1
            usage = response["body"]["usage"]
            s.prompt_tokens += usage["prompt_tokens"]
            s.cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]
            s.output_tokens += usage["completion_tokens"]
        else:
            s.failed += 1
        progress.tick(s, done=1)


def _check_envelope(request) -> str | None:
    """What is wrong with a line's envelope (custom_id, method, url, body), or None."""
    if not isinstance(request, dict):
        return "expected a JSON object"
    for field in ("custom_id", "method", "url", "body"):
        if field not in request:
            return f"{field}: field required"
    if not isinstance(request["custom_id"], str) or not request["custom_id"]:
        return f"custom_id={request['custom_id']!r}: must be a non-empty string"
    if request["method"] != "POST":
        return f"method={request['method']!r}: must be 'POST'"
    if request["url"] not in ENDPOINTS:
        return f"url={request['url']!r}: must be one of {', '.join(ENDPOINTS)}"
    if not isinstance(request["body"], dict):
        return "body: expected a JSON object"
    return None


def stop_on_signals(job: Job):
    """SIGINT / SIGTERM stop the job (admitting ends, lines in flight drain); the previous
    handlers come back after it. Returns a function that restores them."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handle(signum, frame):
        if not job.stopping.is_set():
            print(f"\njaxgen batch: {signal.Signals(signum).name}: stopping (lines in flight "
                  f"finish within {job.options.drain_timeout_s:g}s; rerun to resume)",
                  file=sys.stderr, flush=True)
        job.stopping.set()

    old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(s, h) for s, h in old.items()]

