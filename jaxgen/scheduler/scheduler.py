"""Continuous batching over a paged KV cache: admission, chunked prefill, multi-step decode,
preemption by recompute, prefix sharing.

`schedule()` turns request state into a plain-data `StepPlan`; `update()` folds the device's
`StepOutput` back into request state and returns `RequestEvent`s. While a plan with work is in
flight, the next `schedule()` waits for its `update()` (unless every request of it has ended,
e.g. after a failed device step); `schedule_ahead()` is the exception that keeps the device
busy: it plans the step after the in-flight one (decoding on, prompts chunked on, admissions),
assuming the in-flight one keeps all its tokens, so the engine can launch it before reading the
in-flight one's tokens. Plans name their requests by `Request.serial`, so tokens of a step in
flight never reach a later holder of the same slot or request id. An empty plan carries
nothing for the device and needs no update: slots released and page lists changed go out with
the next plan that has work (see `SlotTable.flush`). Knows requests, slots and the page
allocator; does not know jax, the model, text, or threads (the engine serializes all calls).
"""

from __future__ import annotations

import bisect
import collections
import itertools
import time
from collections.abc import Callable, Sequence

from jaxgen.sampling_params import SamplingParams
from jaxgen.scheduler.config import SchedulerConfig
from jaxgen.scheduler.events import DEADLINE_EXCEEDED, RequestEvent, request_event
from jaxgen.scheduler.ngram import NgramProposer
from jaxgen.scheduler.page_allocator import PageAllocator
from jaxgen.scheduler.plan import PrefillChunk, SlotAssignment, StepOutput, StepPlan
from jaxgen.scheduler.request import Request, RequestStatus
from jaxgen.scheduler.samples import StepSamples, TokenLogprobs
from jaxgen.scheduler.slots import SlotTable


class QueueFullError(RuntimeError):
    """The waiting queue holds `max_waiting` requests; nothing was enqueued (shed load)."""


def check_length(cfg: SchedulerConfig, prompt_ids: Sequence[int], params: SamplingParams) -> None:
    """Raises ValueError unless the prompt is non-empty and prompt + max_tokens fits."""
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids=[]: a prompt needs at least one token")
    if len(prompt_ids) + params.max_tokens > cfg.max_model_len:
        raise ValueError(f"len(prompt_ids)={len(prompt_ids)} + max_tokens={params.max_tokens}"
                         f" = {len(prompt_ids) + params.max_tokens}: exceeds max_model_len="
                         f"{cfg.max_model_len}")


class Scheduler:
    def __init__(self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._clock = clock
        self.allocator = PageAllocator(config.num_pages, config.page_size)
        self._requests: dict[str, Request] = {}  # waiting + running
        # Sorted by params.priority (lower first); first come, first served within a priority.
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []  # admission order: preemption takes the newest (last)
        self._slots = SlotTable(config.num_slots)
        self._events: list[RequestEvent] = []  # ends found by schedule(), not yet handed out
        self._in_flight: list[StepPlan] = []  # oldest first: update() takes them in order
        self._step = 0
        self._serials = itertools.count(1)
        self.num_preemptions = 0
        self.num_draft_tokens = 0  # speculative decoding: drafts verified, and accepted
        self.num_accepted_draft_tokens = 0
        self.verified: list[tuple[int, int]] = []  # (drafts, accepted) per verify, until taken

    # -- requests in ------------------------------------------------------------------------
    def add(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams, seed: int,
            deadline: float | None = None, after: str | None = None) -> None:
        """Queues a request. `after`: the id of another request of the same prompt (a choice of
        n); this one is admitted only once that one's prompt is prefilled and cached."""
        cfg = self.config
        if request_id in self._requests:
            raise ValueError(f"request_id={request_id!r}: a request with this id is in flight")
        check_length(cfg, prompt_ids, params)
        if len(self._waiting) >= cfg.max_waiting:
            raise QueueFullError(f"waiting queue is full: max_waiting={cfg.max_waiting}")
        stop_ids = params.stop_ids(cfg.model_stop_ids)
        request = Request(request_id, tuple(int(t) for t in prompt_ids), params, seed,
                          arrival_time=self._clock(), stop_ids=stop_ids, deadline=deadline,
                          serial=next(self._serials),
                          after=self._requests.get(after) if after is not None else None)
        if cfg.speculative is not None and params.speculative and not params.penalised:
            request.proposer = NgramProposer(cfg.speculative, request.prompt_ids)
        self._requests[request_id] = request
        self._enqueue(request, preempted=False)

    def abort(self, request_id: str, detail: str = "aborted") -> bool:
        """Mark the request: the next `schedule()` ends it (finish_reason "abort"; the event
        comes from the next `update()` or `take_finished_events()`). Safe at any time, a plan in
        flight included. False when it is not in flight (finished, or unknown)."""
        request = self._requests.get(request_id)
        if request is not None and request.pending_abort is None:
            request.pending_abort = detail
        return request is not None

    def finish(self, request_id: str, reason: str, detail: str = "") -> RequestEvent | None:
        """End a request now, for a reason only the engine sees: "stop" (a stop string matched
        on text) or "error". Returns its final event (with usage) for the caller to deliver, or
        None when it is not in flight. Its slot and pages go back at once; if its step is still
        in flight, that step's tokens for it are dropped."""
        if reason not in ("stop", "error"):
            raise ValueError(f"reason={reason!r}: must be 'stop' or 'error'")
        request = self._requests.get(request_id)
        return None if request is None else self._end(request, reason, detail)

    def take_verified(self) -> list[tuple[int, int]]:
        """(drafts, accepted) of each request's verify since the last call (for metrics)."""
        verified, self.verified = self.verified, []
        return verified

    def take_finished_events(self) -> list[RequestEvent]:
        """Final events of requests ended by `schedule()` (aborts, deadlines) not yet handed out
        by `update()`: call after an empty plan, which needs no update."""
        events, self._events = self._events, []
        return events

    # -- planning ---------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """The next step, with nothing in flight (empty when there is nothing to do)."""
        if any(self._live_in(p) for p in self._in_flight):
            raise RuntimeError(f"schedule() called while step {self._in_flight[0].step} is in "
                               f"flight: call update() with its output first")
        self._in_flight = []
        now = self._clock()
        self._drop_leaving(now)
        decode, preempted = self._grow_decoders()
        return self._plan(now, decode, admit=not preempted)

    def schedule_ahead(self) -> StepPlan | None:
        """The step after the one in flight, planned before that one's tokens are known.

        Only when one plan is in flight and no abort or deadline is due. Every request that
        decodes in the in-flight plan, or whose prompt's last chunk it prefills (sampling the
        first token), and that can outlive it, decodes on from where that plan leaves it; if a
        stop token ends it meanwhile, `update()` drops its tokens of this plan. Partly
        prefilled prompts go on from the end of their chunk in flight, and waiting requests are
        admitted into free slots as `schedule()` would, also into a slot freed while the
        in-flight plan still decodes it (plans name requests by serial, and the device runs
        plans in launch order). Pages are reserved for the tokens this step keeps, never by
        preemption. None when nothing can be planned ahead: call `schedule()` once the in-flight
        plan is updated.
        """
        if len(self._in_flight) != 1 or self._speculating():
            return None

        last = self._in_flight[0]
        now = self._clock()
        if any(r.pending_abort is not None or (r.deadline is not None and now >= r.deadline)
               for r in self._requests.values()):
            return None
        decode = self._decoders_after(last)
        if decode is None:
            return None
        plan = self._plan(now, decode, admit=True, after=last)
        return None if plan.empty else plan

    def _plan(self, now: float, rows: list[tuple], admit: bool,
              after: StepPlan | None = None) -> StepPlan:
        """The one planner: `rows` (slot, input position, serial, drafts) of decoding requests
        whose pages are reserved — those with drafts verify them, the others decode — plus
        prompt chunks under the token budget (admitting waiting requests when `admit`);
        `after`: the plan in flight when planning ahead. An empty plan when nothing is to run
        (it is not in flight)."""
        prefills, assignments = self._schedule_prefills(now, admit=admit, after=after)
        if not prefills and not rows:
            return StepPlan(step=self._step)
        page_table_updates, freed_slots = self._slots.flush({a.slot for a in assignments})
        decode = sorted(r for r in rows if not r[3])
        verify = sorted(r for r in rows if r[3])
        plan = StepPlan(
            step=self._step,
            prefills=tuple(prefills),
            decode_slots=tuple(d[0] for d in decode),
            decode_positions=tuple(d[1] for d in decode),
            decode_serials=tuple(d[2] for d in decode),
            num_steps=self.config.decode_steps,
            verify_slots=tuple(v[0] for v in verify),
            verify_positions=tuple(v[1] for v in verify),
            verify_serials=tuple(v[2] for v in verify),
            verify_drafts=tuple(v[3] for v in verify),
            page_table_updates=page_table_updates,
            assignments=tuple(assignments),
            freed_slots=freed_slots,
        )
        self._step += 1
        self._in_flight.append(plan)
        return plan

    def _decoders_after(self, last: StepPlan) -> list[tuple[int, int, int]] | None:
        """The decode rows of the step after `last` (in flight), with their pages reserved; None
        when the pool cannot hold them without preemption."""
        sampled = {c.serial: c for c in last.prefills if c.sample}
        k = self.config.decode_steps
        in_last = set(last.decode_serials)
        grow = []
        for request in self._running:
            chunk = sampled.get(request.serial)
            if chunk is not None:
                made, start = 1, chunk.start + len(chunk.token_ids)  # its first token
            elif request.decoding and request.serial in in_last:
                made, start = k, request.num_computed_tokens + k
            else:
                continue
            if request.params.max_tokens - len(request.output_ids) <= made:
                continue  # ends with the in-flight step (length)
            grow.append((request, start, self._pages_to_decode_from(request, start)))
        if not self.allocator.can_allocate(sum(n for _, _, n in grow)):
            return None
        for request, _, n in grow:
            if n:
                request.pages += self.allocator.allocate(n)
                self._slots.pages_changed(request.slot)
        return [(request.slot, start, request.serial, ()) for request, start, _ in grow]

    def abandon_in_flight(self) -> None:
        """Forget plans that will never be updated (their device step failed)."""
        self._in_flight = []

    def _live_in(self, plan: StepPlan) -> bool:
        return (any(self._chunk_holder(c) for c in plan.prefills)
                or any(self._slot_holder(s, n) for s, n in zip(
                    plan.decode_slots + plan.verify_slots, plan.decode_serials + plan.verify_serials)))

    def _chunk_holder(self, chunk: PrefillChunk) -> Request | None:
        """The request `chunk` was planned for, unless it ended since."""
        request = self._requests.get(chunk.request_id)
        return request if request is not None and request.serial == chunk.serial else None

    def _slot_holder(self, slot: int, serial: int) -> Request | None:
        """The request that decodes in `slot` under `serial`, unless it left the slot since."""
        request = self._slots[slot]
        return request if request is not None and request.serial == serial else None

    def _drop_leaving(self, now: float) -> None:
        for request in list(self._requests.values()):
            detail = request.pending_abort
            if detail is None and request.deadline is not None and now >= request.deadline:
                detail = f"{DEADLINE_EXCEEDED} ({now - request.deadline:.3f}s past)"
            if detail is not None:
                self._events.append(self._end(request, "abort", detail))

    def _grow_decoders(self) -> tuple[list[tuple], bool]:
        """Give every decoding request pages for the tokens it keeps this step, oldest first,
        preempting the newest running requests when the pool runs dry; a request with drafts
        (speculative decoding) verifies them instead of decoding. Returns (rows: slot, input
        position, serial, drafts; whether anyone was preempted)."""
        rows, preempted = [], False
        for request in [r for r in self._running if r.decoding]:
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted to make room for an older request
            request.drafts = self._drafts(request)
            need = self._pages_to_decode_from(request, request.num_computed_tokens,
                                              len(request.drafts) + 1 if request.drafts else None)
            pages = self.allocator.allocate(need)
            while pages is None:
                victim = self._running[-1]  # the newest: never an older, already-served one
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
                pages = self.allocator.allocate(need)
            if pages is None:
                continue
            if pages:
                request.pages += pages
                self._slots.pages_changed(request.slot)
            rows.append(request)
        # Read after the loop: a request preempted by a later one's growth leaves the rows.
        return [(r.slot, r.num_computed_tokens, r.serial, r.drafts) for r in rows
                if r.status is RequestStatus.RUNNING], preempted

    def _speculating(self) -> bool:
        """Whether a running request drafts now: its drafts come from its latest tokens, known
        only once the step in flight is read, so nothing is planned ahead (and a request whose
        drafts keep failing cools down, and lets the look-ahead run meanwhile)."""
        return self._drafting() and any(r.proposer is not None and r.proposer.active
                                        for r in self._running)

    def _drafting(self) -> bool:
        """Whether requests draft at all now: speculation on, and the batch small enough."""
        spec = self.config.speculative
        return spec is not None and len(self._running) <= spec.max_batch

    def _drafts(self, request: Request) -> tuple[int, ...]:
        """Draft tokens to verify this step (speculative decoding), () to decode as usual. At
        most what max_tokens leaves room for: every draft accepted, plus one more token."""
        if request.proposer is None or not self._drafting():
            return ()
        return request.proposer.propose(request.params.max_tokens - len(request.output_ids) - 1)

    def _pages_to_decode_from(self, request: Request, position: int, inputs: int | None = None) -> int:
        """New pages `request` needs to feed `inputs` tokens (default: `decode_steps`) from
        `position`. Feeding p writes p .. p+k-1; tokens past max_len are discarded and writes
        past the page-table row land in the null page, so only kept positions need pages."""
        inputs = self.config.decode_steps if inputs is None else inputs
        last = min(position + inputs - 1, request.max_len - 1)
        return max(0, last // self.config.page_size + 1 - len(request.pages))

    def _schedule_prefills(self, now: float, admit: bool, after: StepPlan | None = None):
        """Prompt chunks under the step's token budget: partly prefilled requests first, then
        admissions. `after`: the plan in flight when planning ahead; its chunks count as done."""
        in_flight = {c.serial: c for c in after.prefills} if after is not None else {}
        budget = self.config.max_prefill_tokens
        chunks = []
        for request in self._running:
            if budget == 0:
                break
            last = in_flight.get(request.serial)
            if request.decoding or (last is not None and last.sample):
                continue  # decodes (next), its prompt done
            start = request.num_computed_tokens if last is None else last.start + len(last.token_ids)
            chunks.append(self._chunk(request, budget, start))
            budget -= len(chunks[-1].token_ids)
        # After a preemption the pool is short: admitting now would only feed the next one.
        admitted, assignments = self._admit_waiting(now, budget) if admit else ([], [])
        return chunks + admitted, assignments

    def _admit_waiting(self, now: float, budget: int):
        """Admits waiting requests in queue order while the budget lasts, a slot is free and
        their pages fit; returns (first chunks, assignments)."""
        chunks, assignments = [], []
        while budget > 0 and self._waiting and self._slots.num_free:
            request = self._waiting[0]
            if self._leader_prefilling(request) or not self._admit(request, now):
                break  # nobody overtakes the head of the queue (priority, then arrival order)
            self._waiting.popleft()
            assignments.append(SlotAssignment(request.slot, request.request_id, request.params,
                                              request.seed, request.prompt_ids,
                                              tuple(request.output_ids)))
            chunks.append(self._chunk(request, budget))
            budget -= len(chunks[-1].token_ids)
        return chunks, assignments

    def _leader_prefilling(self, request: Request) -> bool:
        """Whether `request` waits for the choice it follows to finish prefilling the prompt."""
        leader = request.after
        return (leader is not None and self.config.enable_prefix_cache and not leader.decoding
                and leader.status is not RequestStatus.FINISHED)

    def _chunk(self, request: Request, budget: int, start: int | None = None) -> PrefillChunk:
        """The next chunk from `start` (default num_computed_tokens: the invariant, see
        Request, is that prefill catches it up with num_tokens)."""
        start = request.num_computed_tokens if start is None else start
        end = min(request.num_tokens, start + budget)
        return PrefillChunk(request.request_id, request.slot, start,
                            request.token_ids(start, end), sample=end == request.num_tokens,
                            serial=request.serial)

    def _admit(self, request: Request, now: float) -> bool:
        """Place the head of the queue in a slot with pages for all its known tokens (reserved
        whole, so a chunked prefill never waits on the pool mid-prompt). False if they do not
        fit."""
        n, ps = request.num_tokens, self.config.page_size
        # Never the whole sequence from cache: its last token must be fed to get logits.
        use_cache = self.config.enable_prefix_cache
        cacheable = request.token_ids(0, n - 1)
        hit = self.allocator.lookup_prefix(cacheable) if use_cache else []
        need = -(-n // ps) - len(hit)
        if not self.allocator.can_allocate(need, sharing=hit):
            return False
        if use_cache:
            hit = self.allocator.match_prefix(cacheable)
        request.pages = hit + self.allocator.allocate(need)
        request.page_hashes = []
        request.num_computed_tokens = len(hit) * ps
        request.slot = self._slots.take(request)
        request.status = RequestStatus.RUNNING
        self._running.append(request)
        if request.first_scheduled_time is None:
            request.first_scheduled_time = now
            request.num_cached_prompt_tokens = min(len(hit) * ps, len(request.prompt_ids))
        return True

    def _preempt(self, request: Request) -> None:
        """Recompute-style preemption: drop pages and slot, keep the outputs, and requeue at the
        front; re-admission prefills prompt + outputs (its full pages may still be cached)."""
        self._release(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(request, preempted=True)

    def _enqueue(self, request: Request, preempted: bool) -> None:
        """Insert by priority: a new request goes behind every waiting one of its priority; a
        preempted one goes ahead of them (it arrived before any of them was admitted)."""
        insert = bisect.bisect_left if preempted else bisect.bisect_right
        at = insert(self._waiting, request.params.priority, key=lambda r: r.params.priority)
        self._waiting.insert(at, request)

    def _release(self, request: Request) -> None:
        if request.status is RequestStatus.RUNNING:
            self.allocator.free(request.pages)
            self._running.remove(request)
            self._slots.release(request.slot)
        elif request.status is RequestStatus.WAITING:
            self._waiting.remove(request)
        request.pages, request.page_hashes, request.slot = [], [], None
        request.num_computed_tokens, request.decoding = 0, False

    def _end(self, request: Request, reason: str, detail: str, token_ids: Sequence[int] = (),
             logprobs: tuple[TokenLogprobs, ...] | None = None) -> RequestEvent:
        self._release(request)
        request.status = RequestStatus.FINISHED
        del self._requests[request.request_id]
        return request_event(request, token_ids, logprobs, (reason, detail))

    # -- results in -------------------------------------------------------------------------
    def update(self, plan: StepPlan, output: StepOutput | None) -> list[RequestEvent]:
        """Fold the executed `plan`'s output into request state. Returns the final events of
        requests ended by schedule() (see `take_finished_events`), then this step's events.
        `output` may be None for an empty plan."""
        events = self.take_finished_events()
        if plan.empty:
            return events
        if not self._in_flight or plan is not self._in_flight[0]:
            raise RuntimeError(f"update() got the plan of step {plan.step}, which is not the "
                               f"one in flight (the oldest, when several are)")
        if output is None:
            raise ValueError(f"output=None for step {plan.step}, which has work")
        self._in_flight.pop(0)
        samples, now = StepSamples(plan, output), self._clock()
        # Aborts and deadlines take effect at every step, also when the next step is already
        # in flight (a look-ahead): the request's tokens of the in-flight steps are dropped.
        self._drop_leaving(now)
        events += self.take_finished_events()
        kept = {}  # request -> (token ids, logprobs, finish)
        for i, chunk in enumerate(plan.prefills):
            request = self._chunk_holder(chunk)
            if request is None:
                continue  # finished by the engine while its step was in flight
            request.num_computed_tokens += len(chunk.token_ids)
            if chunk.sample:
                request.decoding = True
                kept[request] = self._take(request, samples, "prefill", i, now)
            else:
                self._register_full_pages(request)
        for slot, serial in zip(plan.decode_slots, plan.decode_serials):
            request = self._slot_holder(slot, serial)
            if request is None:
                continue  # ended while its step was in flight (its slot may be another's now)
            kept[request] = self._take(request, samples, "decode", slot, now)
        for slot, serial, drafts in zip(plan.verify_slots, plan.verify_serials, plan.verify_drafts):
            request = self._slot_holder(slot, serial)
            if request is None:
                continue
            accepted = len(samples.tokens("verify", slot)) - 1
            request.proposer.record(len(drafts), accepted)
            kept[request] = self._take(request, samples, "verify", slot, now)
            self.num_draft_tokens += len(drafts)
            self.num_accepted_draft_tokens += accepted
            self.verified.append((len(drafts), accepted))
        for request, (token_ids, logprobs, finish) in kept.items():
            self._register_full_pages(request)
            events.append(self._end(request, *finish, token_ids, logprobs) if finish
                          else request_event(request, token_ids, logprobs))
        return events

    @staticmethod
    def _take(request: Request, samples: StepSamples, kind: str, index: int, now: float):
        tokens = samples.tokens(kind, index)
        n, finish = request.append_outputs(tokens)
        if kind != "prefill":
            # The input of each kept token (the one before it) now has K/V in pages.
            request.num_computed_tokens += n
        if request.proposer is not None:
            request.proposer.extend(tokens[:n])
        if request.first_token_time is None:
            request.first_token_time = now
        return tokens[:n], samples.logprobs(kind, index, n, request.params.logprobs), finish

    def _register_full_pages(self, request: Request) -> None:
        """Offer the pages whose every token has K/V (computed, not merely known) to the cache."""
        ps, done = self.config.page_size, len(request.page_hashes)
        full = request.num_computed_tokens // ps
        if self.config.enable_prefix_cache and full > done:
            request.page_hashes = self.allocator.register_full_pages(
                request.token_ids(done * ps, full * ps), request.pages, request.page_hashes)

    # -- stats ------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_free_slots(self) -> int:
        return self._slots.num_free

    @property
    def num_pages_used(self) -> int:
        return self.allocator.num_used

    @property
    def num_pages_free(self) -> int:
        """Pages allocatable now: free ones plus cached ones nobody holds (evictable)."""
        return self.allocator.num_available

    @property
    def prefix_cache_query_tokens(self) -> int:
        return self.allocator.prefix_query_tokens

    @property
    def prefix_cache_hit_tokens(self) -> int:
        return self.allocator.prefix_hit_tokens

    def has_work(self) -> bool:
        """Requests in flight, or events still to hand out: the engine should keep stepping."""
        return bool(self._requests or self._events)

    def running_ids(self) -> tuple[str, ...]:
        return tuple(r.request_id for r in self._running)

    def waiting_ids(self) -> tuple[str, ...]:
        """In admission order."""
        return tuple(r.request_id for r in self._waiting)

    def check_invariants(self) -> None:
        """Raise AssertionError unless slots, queues, pages and counters agree (for tests)."""
        self.allocator.check_invariants([r.pages for r in self._running])
        for r in self._waiting:
            r.check_invariant(self.config.page_size)
        priorities = [r.params.priority for r in self._waiting]
        if priorities != sorted(priorities):
            raise AssertionError(f"waiting queue is not in priority order: {priorities}")
        for r in self._running:
            r.check_invariant(self.config.page_size)
            if self._slots[r.slot] is not r:
                raise AssertionError(f"running request {r.request_id} is not in its slot")
        self._slots.check()
        if len(self._requests) != len(self._running) + len(self._waiting):
            raise AssertionError("request table disagrees with the queues")
