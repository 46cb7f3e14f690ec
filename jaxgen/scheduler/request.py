"""Host-side state of one request: counters, a page list and a slot.

Knows the request's tokens, how many of them have K/V in its pages, its stop conditions and
timestamps. Does not know the page pool, other requests, text or the device; the scheduler moves
it between states and the allocator owns its pages.
"""

from __future__ import annotations

import dataclasses
import enum

from jaxgen.sampling_params import SamplingParams
from jaxgen.scheduler.ngram import NgramProposer


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no slot and no pages (new, or preempted)
    RUNNING = "running"  # holds a slot and pages
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    """The one invariant: the request's known tokens are `prompt_ids + output_ids`, and K/V of
    the first `num_computed_tokens` of them are in `pages`. Each step the scheduler lets the
    computed tokens catch up with the known ones:

      * while `decoding` is False, the next prefill chunk covers known tokens
        [num_computed_tokens, num_tokens), cut to the step's token budget, and the chunk that
        reaches num_tokens samples a token. A new prompt starts at 0, a prefix-cache hit at the
        end of its cached pages, a recompute after preemption at 0 (or its own cached pages)
        with its outputs so far counted as known;
      * once that chunk has sampled, `decoding` is True and num_computed_tokens ==
        num_tokens - 1: the last known token is the sampled one, held on device as the next
        decode input (and not yet fed, hence not computed).
    """

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    seed: int
    arrival_time: float
    stop_ids: frozenset[int]  # model stop ids (unless ignore_eos) plus params.stop_token_ids
    deadline: float | None = None  # clock seconds, None: no deadline
    # Unique among the scheduler's requests, unlike request_id (reusable once a request ends):
    # plans name the requests they were made for by it.
    serial: int = 0
    output_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    decoding: bool = False  # a chunk reaching the last known token sampled in the current slot
    pages: list[int] = dataclasses.field(default_factory=list)
    # Chain hashes of the full computed pages already offered to the prefix cache, and the
    # chain's root (from params.cache_salt: requests of other salts never share a page).
    page_hashes: list[bytes] = dataclasses.field(default_factory=list)
    cache_root: bytes = b""
    slot: int | None = None
    status: RequestStatus = RequestStatus.WAITING
    num_cached_prompt_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    pending_abort: str | None = None  # detail of an abort(), applied at the next schedule()
    # Another choice of the same prompt (n > 1): this one is admitted once that one's prompt is
    # prefilled, so its pages come from the prefix cache (the prompt is computed once).
    after: "Request | None" = None
    # Speculative decoding: the request's draft source (None: it does not speculate), and the
    # drafts of the step being planned.
    proposer: "NgramProposer | None" = None
    drafts: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_len(self) -> int:
        """Most tokens the sequence can ever hold (prompt + max_tokens)."""
        return len(self.prompt_ids) + self.params.max_tokens

    def token_ids(self, start: int = 0, stop: int | None = None) -> tuple[int, ...]:
        """Known tokens [start, stop) without building the whole sequence."""
        n_prompt = len(self.prompt_ids)
        stop = self.num_tokens if stop is None else stop
        head = self.prompt_ids[start:stop] if start < n_prompt else ()
        if stop <= n_prompt:
            return head
        return head + tuple(self.output_ids[max(0, start - n_prompt):stop - n_prompt])

    def append_outputs(self, tokens: list[int]) -> tuple[int, tuple[str, str] | None]:
        """Record sampled tokens up to the first that ends the request; the rest are discarded
        (the device ran past the stop). Returns (number kept, (finish_reason, detail) or None)."""
        room = self.params.max_tokens - len(self.output_ids)
        kept = tokens[:room]
        stop = next((n for n, t in enumerate(kept) if t in self.stop_ids), None)
        if stop is not None:
            self.output_ids += kept[:stop + 1]
            return stop + 1, ("stop", f"stop token {kept[stop]}")
        self.output_ids += kept
        if len(kept) == room:
            return room, ("length", f"max_tokens={self.params.max_tokens} reached")
        return len(kept), None

    def check_invariant(self, page_size: int) -> None:
        """Raise AssertionError unless the state obeys the invariant above (for tests)."""
        if self.status is RequestStatus.WAITING:
            ok = not self.pages and self.slot is None and not self.num_computed_tokens
            ok = ok and not self.decoding
        else:
            # Prefilling requests hold pages for all known tokens (reserved at admission);
            # decoding ones get the next token's page when they are scheduled.
            covered = self.num_computed_tokens if self.decoding else self.num_tokens
            ok = (self.status is RequestStatus.RUNNING and self.slot is not None
                  and self.num_computed_tokens <= self.num_tokens
                  and covered <= len(self.pages) * page_size
                  and (not self.decoding or self.num_computed_tokens == self.num_tokens - 1))
        if not ok:
            raise AssertionError(
                f"request {self.request_id} ({self.status.value}): computed "
                f"{self.num_computed_tokens} of {self.num_tokens} known tokens, decoding="
                f"{self.decoding}, {len(self.pages)} pages, slot {self.slot}")
