"""`jaxgen batch`: OpenAI Batch files through an in-process engine — resumable, bounded in
memory, one record per line (a failed line is a record, never the end of the job).

    from jaxgen.batch import run
    summary = run("requests.jsonl", "results.jsonl", config)   # again later: it resumes

`run` builds the engine from `config` (`jaxgen.build.build_engine`) unless given one; the job
steps it on the caller's thread, so a given engine must not run its loop thread (`start()`).
"""

from __future__ import annotations

import dataclasses
import json

from jaxgen.batch.files import BatchInput, BatchOutput, JobError
from jaxgen.batch.job import BatchOptions, Job, Summary, stop_on_signals
from jaxgen.batch.progress import Progress
from jaxgen.config import Config

__all__ = ["BatchOptions", "JobError", "Summary", "run"]


def run(input: str, output: str, config: Config | None = None,
        options: BatchOptions = BatchOptions(), engine=None) -> Summary:
    """Runs the job (INPUT and OUTPUT paths; "-" for stdin / stdout). Raises JobError (with its
    exit status) when the job cannot run: duplicate custom_ids, an OUTPUT that is not a batch
    output. Returns the summary; `summary.complete` is False when it was interrupted. `engine`:
    one already built (not started: the job steps it)."""
    inp = BatchInput(input)
    own = engine is None
    try:
        ids = inp.check_unique()
        out = BatchOutput(output)
        try:
            if own:
                from jaxgen.build import build_engine

                engine = build_engine(config or Config())
            elif engine.running:
                raise ValueError("engine: must not be started (its loop thread would step it "
                                 "beside the job); the job steps it")
            job = Job(engine, inp, out, options)
            progress = Progress(len(ids), len(out.done & ids), options.quiet)
            del ids
            restore = stop_on_signals(job)
            try:
                summary = job.run(progress.total, progress)
            finally:
                restore()
                progress.close()
                engine.observers.remove(job.finished)
        finally:
            out.close()
            if own and engine is not None:
                engine.stop()
    finally:
        inp.close()
    if options.summary_json:
        with open(options.summary_json, "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(summary) | {"complete": summary.complete}, f, indent=1)
    return summary

