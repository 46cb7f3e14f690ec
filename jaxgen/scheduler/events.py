"""What the scheduler reports per request after each step: new tokens, finish, usage.

Plain frozen data handed to the engine, which feeds the detokenizer and the request's stream.
Knows nothing about text: stop strings are matched by the engine, which then calls
`Scheduler.finish`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jaxgen.scheduler.request import Request
from jaxgen.scheduler.samples import TokenLogprobs

FINISH_REASONS = ("stop", "length", "abort", "error")
# The detail of an "abort" that a request's deadline caused starts with this.
DEADLINE_EXCEEDED = "deadline exceeded"
# ... and of one that shed load (displaced from a full queue, or waited too long: overload.py).
SHED = "shed"


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int  # prompt tokens served by the prefix cache at first admission
    num_preemptions: int
    queue_time: float | None  # first scheduled - arrival (s); None if never scheduled
    time_to_first_token: float | None  # first token - arrival (s); None if none was produced
    draft_tokens: int = 0  # speculative decoding: drafts verified
    accepted_draft_tokens: int = 0  # ... and accepted (each an output token that cost no step)

    @classmethod
    def of(cls, request: Request) -> Usage:
        def since_arrival(t):
            return None if t is None else t - request.arrival_time

        return cls(prompt_tokens=len(request.prompt_ids),
                   completion_tokens=len(request.output_ids),
                   cached_prompt_tokens=request.num_cached_prompt_tokens,
                   num_preemptions=request.num_preemptions,
                   queue_time=since_arrival(request.first_scheduled_time),
                   time_to_first_token=since_arrival(request.first_token_time),
                   draft_tokens=request.proposer.proposed if request.proposer else 0,
                   accepted_draft_tokens=request.proposer.accepted if request.proposer else 0)


@dataclasses.dataclass(frozen=True)
class RequestEvent:
    """New tokens of one request from one step, and/or its end.

    `logprobs`, when the request asked for them: one `TokenLogprobs` (token id, logprob, top
    alternatives) per token of `token_ids`; else None.
    `usage` is set on the final event only (the one with a finish_reason).
    """

    request_id: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprobs, ...] | None = None
    finish_reason: str | None = None  # None while running, else one of FINISH_REASONS
    detail: str = ""  # why it finished: which stop, "deadline exceeded", an error message
    usage: Usage | None = None

    def __post_init__(self):
        if self.finish_reason is not None and self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason={self.finish_reason!r}: must be one of "
                             f"{FINISH_REASONS} or None")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def request_event(request: Request, token_ids: Sequence[int] = (),
                  logprobs: tuple[TokenLogprobs, ...] | None = None,
                  finish: tuple[str, str] | None = None) -> RequestEvent:
    """The event for `request`'s kept tokens of one step; `finish` = (reason, detail)."""
    return RequestEvent(request.request_id, tuple(token_ids), logprobs,
                        finish_reason=finish[0] if finish else None,
                        detail=finish[1] if finish else "",
                        usage=Usage.of(request) if finish else None)
