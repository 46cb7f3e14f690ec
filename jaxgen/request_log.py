"""One structured log line per finished request (logfmt at INFO on the `jaxgen.requests` logger):
id, outcome, finish reason, tokens, queue time, TTFT, end-to-end time, preemptions. Prompt text
only when asked for (`jaxgen serve --log-prompts`): prompts may hold what operators must not keep.
"""

from __future__ import annotations

import json
import logging

from jaxgen.engine_api import EngineObserver, FinishedRequest

log = logging.getLogger("jaxgen.requests")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


class RequestLog(EngineObserver):
    def __init__(self, tokenizer=None, log_prompts: bool = False):
        self.tokenizer = tokenizer if log_prompts else None

    def on_finish(self, finished: FinishedRequest) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        out, u = finished.output, finished.output.usage
        fields = [f"id={out.request_id}", f"outcome={out.outcome}",
                  f"finish_reason={out.finish_reason}"]
        if u is not None:
            fields += [f"prompt_tokens={u.prompt_tokens}", f"completion_tokens={u.completion_tokens}",
                       f"cached_tokens={u.cached_prompt_tokens}", f"queue_s={_seconds(u.queue_time)}",
                       f"ttft_s={_seconds(u.time_to_first_token)}", f"preemptions={u.num_preemptions}"]
        fields.append(f"e2e_s={finished.e2e_seconds:.4f}")
        if out.detail:
            fields.append(f"detail={json.dumps(out.detail)}")
        if self.tokenizer is not None:
            fields.append(f"prompt={json.dumps(self.tokenizer.decode(list(finished.prompt_ids)))}")
        log.info("request %s", " ".join(fields))
