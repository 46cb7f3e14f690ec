"""Scheduler tests with no device: a fake executor runs each StepPlan with a model whose next
token is computable by hand, reading every token back from the KV pages the plan names.

The fake model: feeding position p, the next token is (sum of the tokens at positions 0..p as
read from the pages + p) % V, so a request's stream is a function of its prompt alone and any
scheduling bug (wrong chunk, position, page, preemption bookkeeping) changes it. Each K/V entry
also carries a digest of the sequence up to its position; a read checks it against the reader's
own sequence, so reading K/V a request neither wrote nor shares by prefix fails at once, and
pages on the free list are poisoned before every step.
"""

import collections
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxgen.sampling_params import SamplingParams
from jaxgen.scheduler import (NULL_PAGE, QueueFullError, Scheduler, SchedulerConfig, StepOutput,
                              StepPlan)

V = 101
MODEL_STOP = frozenset({0})
POISON = "poison"
GARBAGE = -1  # the token of rows the scheduler must not keep


def reference(prompt, params, model_stop_ids=MODEL_STOP):
    """The request run alone, naively: the slow twin of the whole pipeline."""
    stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(model_stop_ids))
    seq, out = list(prompt), []
    while len(out) < params.max_tokens:
        out.append((sum(seq) + len(seq) - 1) % V)
        seq.append(out[-1])
        if out[-1] in stop:
            break
    return out


class FakeExecutor:
    """Runs plans on host; knows only what the plans say (rows, chunks, positions, assignments)."""

    def __init__(self, cfg: SchedulerConfig):
        self.cfg, self.ps = cfg, cfg.page_size
        self.kv = [[POISON] * self.ps for _ in range(cfg.num_pages)]
        self.rows = [()] * cfg.num_slots
        self.seqs = [None] * cfg.num_slots  # the tokens each slot holds, per the plans
        self.digests = [None] * cfg.num_slots
        self.filled = [None] * cfg.num_slots  # next position to feed
        self.owner = [None] * cfg.num_slots
        self.prefilled = collections.Counter()  # request id -> tokens fed by prefill chunks
        self.reads = self.poisoned = 0
        self.plans = []

    def poison(self, pages):
        for page in pages:
            self.kv[page] = [POISON] * self.ps
            self.poisoned += 1

    def run(self, plan: StepPlan) -> StepOutput:
        self.plans.append(plan)
        for s in plan.freed_slots:
            self.seqs[s] = self.owner[s] = None
        for a in plan.assignments:
            self.seqs[a.slot] = list(a.prompt_ids + a.output_ids)
            self.digests[a.slot], self.filled[a.slot], self.owner[a.slot] = [], None, a.request_id
        for s, row in plan.page_table_updates.items():
            self.rows[s] = tuple(row)
        self.users = collections.defaultdict(set)
        for s, row in enumerate(self.rows):
            for page in row:
                self.users[page].add(s)
        prefill = np.full(len(plan.prefills), GARBAGE, np.int32)
        for i, chunk in enumerate(plan.prefills):
            s, seq = chunk.slot, self.seqs[chunk.slot]
            assert self.owner[s] == chunk.request_id and s not in plan.decode_slots
            assert chunk.token_ids, "empty prefill chunk"
            assert self.filled[s] in (None, chunk.start), "chunk does not continue the last one"
            assert chunk.token_ids == tuple(seq[chunk.start:chunk.start + len(chunk.token_ids)])
            assert chunk.sample == (chunk.start + len(chunk.token_ids) == len(seq))
            for q in range(chunk.start, chunk.start + len(chunk.token_ids)):
                token = self._feed(s, q)
            self.prefilled[chunk.request_id] += len(chunk.token_ids)
            if chunk.sample:
                prefill[i] = token
                seq.append(token)
        decode = np.full((plan.num_steps, self.cfg.num_slots), GARBAGE, np.int32)
        assert list(plan.decode_slots) == sorted(plan.decode_slots)
        for s, p in zip(plan.decode_slots, plan.decode_positions):
            assert p == self.filled[s] == len(self.seqs[s]) - 1, "decode input is not on device"
            for t in range(plan.num_steps):
                decode[t, s] = self._feed(s, p + t)
                self.seqs[s].append(int(decode[t, s]))
        return StepOutput(prefill, decode, *self._logprobs(prefill), *self._logprobs(decode))

    @staticmethod
    def _logprobs(tokens):
        top = np.stack([tokens, (tokens + 1) % V, (tokens + 2) % V], axis=-1)
        return -tokens / 100.0, top, -np.abs(top) / 100.0 - 1.0

    def _digest(self, s, j):
        seq, digests = self.seqs[s], self.digests[s]
        while len(digests) <= j:
            digests.append(hash((digests[-1] if digests else None, seq[len(digests)])))
        return digests[j]

    def _feed(self, s, q):
        """Write K/V of position q, then attend over 0..q through the slot's page-table row."""
        row, ps = self.rows[s], self.ps
        page = row[q // ps] if q // ps < len(row) else NULL_PAGE
        if page != NULL_PAGE:  # past the row: the null page, read only by discarded lookahead
            assert self.users[page] == {s}, f"slot {s} writes page {page} that another slot maps"
            self.kv[page][q % ps] = (self.seqs[s][q], self._digest(s, q))
        self.filled[s] = q + 1
        total, through_null = 0, False
        for j in range(q + 1):
            if j // ps >= len(row) or row[j // ps] == NULL_PAGE:
                through_null = True  # a lookahead past the kept tokens: its output is garbage
                continue
            entry = self.kv[row[j // ps]][j % ps]
            assert entry is not POISON, f"slot {s} read a freed page at position {j}"
            assert entry[1] == self._digest(s, j), f"slot {s} read foreign K/V at position {j}"
            total += entry[0]
            self.reads += 1
        return GARBAGE if through_null else (total + q) % V


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def make(clock=None, **overrides):
    fields = dict(num_slots=3, num_pages=40, max_model_len=128, page_size=16, max_waiting=64,
                  max_prefill_tokens=64, decode_steps=2, model_stop_ids=MODEL_STOP,
                  enable_prefix_cache=True)
    fields.update(overrides)
    cfg = SchedulerConfig(**fields)
    sched = Scheduler(cfg, clock=clock) if clock else Scheduler(cfg)
    return sched, FakeExecutor(cfg)


def step(sched, ex):
    preemptions = sched.num_preemptions
    plan = sched.schedule()
    if sched.num_preemptions > preemptions:  # the pool is short: nobody is admitted this step
        assert not plan.assignments
    ex.poison(sched.allocator.free_pages())
    events = sched.update(plan, ex.run(plan))
    sched.check_invariants()
    return plan, events


def serve(sched, ex, arrivals, max_steps=3000, stepper=None, abort_at=None):
    """Run until everything finished. arrivals: {step: [(id, prompt, params), ...]}; abort_at:
    {step: id}; stepper(sched, ex) -> events runs one engine step (default: `step`)."""
    stepper = stepper or (lambda s, e: step(s, e)[1])
    arrivals = {k: list(v) for k, v in arrivals.items()}
    streams, finals, n = collections.defaultdict(list), {}, 0
    while arrivals or sched.has_work():
        for rid, prompt, params in arrivals.pop(n, ()):
            sched.add(rid, prompt, params, seed=0)
        if abort_at and n in abort_at:
            sched.abort(abort_at[n])
        for event in stepper(sched, ex):
            assert event.request_id not in finals, "event after the final one"
            streams[event.request_id] += event.token_ids
            if event.finished:
                finals[event.request_id] = event
        n += 1
        assert n < max_steps, "no progress"
    assert sched.allocator.num_used == 0
    sched.allocator.check_invariants([])
    return dict(streams), finals


def prompt(n, seed):
    return [int(x) for x in np.random.default_rng(seed).integers(1, V, n)]


def mixed_load(n=10):
    """Staggered arrivals, prompts of 1..80 tokens, outputs of 1..40, stop ids and ignore_eos."""
    rng = np.random.default_rng(7)
    arrivals = collections.defaultdict(list)
    for i in range(n):
        length = int(rng.integers(1, 81))
        params = SamplingParams(max_tokens=int(rng.integers(1, min(41, 128 - length))),
                                stop_token_ids=tuple(range(1, 6)) if i % 3 == 0 else (),
                                ignore_eos=i % 4 == 1)
        arrivals[int(rng.integers(0, 12))].append((f"r{i}", prompt(length, i), params))
    return arrivals


def expected(arrivals):
    return {rid: reference(p, params) for reqs in arrivals.values() for rid, p, params in reqs}


@pytest.mark.parametrize("decode_steps", [1, 4])
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_continuous_batching_equals_each_request_alone(decode_steps, prefix_cache):
    arrivals = mixed_load()
    sched, ex = make(decode_steps=decode_steps, max_prefill_tokens=24,
                     enable_prefix_cache=prefix_cache)
    streams, finals = serve(sched, ex, arrivals)
    want = expected(arrivals)
    assert streams == want
    params = {rid: p for reqs in arrivals.values() for rid, _, p in reqs}
    for rid, event in finals.items():
        stopped = len(want[rid]) < params[rid].max_tokens or want[rid][-1] in (
            set(params[rid].stop_token_ids) | (set() if params[rid].ignore_eos else MODEL_STOP))
        assert event.finish_reason == ("stop" if stopped else "length")
        assert event.usage.completion_tokens == len(want[rid])
    # The load really was mixed: prompts split into chunks, and chunks ran beside decodes.
    assert any(not c.sample for plan in ex.plans for c in plan.prefills)
    assert any(plan.prefills and plan.decode_slots for plan in ex.plans)
    assert max(len(plan.decode_slots) for plan in ex.plans) == 3
    assert all(plan.num_prefill_tokens <= 24 for plan in ex.plans)


def test_each_request_alone_through_the_scheduler_equals_the_reference():
    for reqs in mixed_load().values():
        for rid, p, params in reqs:
            sched, ex = make(decode_steps=3, max_prefill_tokens=16)
            assert serve(sched, ex, {0: [(rid, p, params)]})[0][rid] == reference(p, params)


def test_small_pool_preempts_and_still_completes_correctly():
    arrivals = {0: [(f"r{i}", prompt(20 + 3 * i, i), SamplingParams(max_tokens=60, ignore_eos=True))
                    for i in range(6)]}
    # 12 usable pages, 4 slots; each request grows to 5 pages: the pool runs dry mid-decode.
    sched, ex = make(num_slots=4, num_pages=13, decode_steps=4, max_prefill_tokens=48)
    streams, finals = serve(sched, ex, arrivals)
    assert streams == expected(arrivals)
    assert sched.num_preemptions > 0
    assert sum(e.usage.num_preemptions for e in finals.values()) == sched.num_preemptions
    # A re-admitted request carries its outputs so far (for penalties).
    assert any(a.output_ids for plan in ex.plans for a in plan.assignments)


def test_prefix_cache_prefills_only_the_suffix_and_changes_no_token():
    shared = prompt(70, 1)  # 4 full pages + 6 tokens
    first = ("a", shared, SamplingParams(max_tokens=5))
    second = ("b", shared[:64] + prompt(10, 2), SamplingParams(max_tokens=9))
    exact = ("c", shared[:64], SamplingParams(max_tokens=3))  # the whole prompt is cached
    results = {}
    for cache in (True, False):
        sched, ex = make(enable_prefix_cache=cache)
        streams, finals = serve(sched, ex, {0: [first], 20: [second], 40: [exact]})
        results[cache] = streams
        if cache:
            assert ex.prefilled["b"] == 10 and finals["b"].usage.cached_prompt_tokens == 64
            # At least one token is computed, to sample from: the last page is recomputed.
            assert ex.prefilled["c"] == 16 and finals["c"].usage.cached_prompt_tokens == 48
            assert sched.prefix_cache_hit_tokens == 64 + 48
            assert sched.prefix_cache_query_tokens == 69 + 73 + 63
        else:
            assert ex.prefilled["b"] == 74 and finals["b"].usage.cached_prompt_tokens == 0
    assert results[True] == results[False] == expected({0: [first, second, exact]})


def test_choices_of_one_prompt_prefill_it_once():
    """n choices (`add(..., after=first)`): the others wait until the first has prefilled the
    prompt, then take its full pages from the prefix cache; a finished or aborted first does
    not hold them back, and without a prefix cache there is nothing to wait for."""
    shared = prompt(70, 1)  # 4 full pages + 6 tokens
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    sched, ex = make(max_prefill_tokens=128)
    sched.add("c0", shared, params, seed=0)
    sched.add("c1", shared, params, seed=1, after="c0")
    sched.add("c2", shared, params, seed=2, after="c0")
    plan = sched.schedule()
    assert [c.request_id for c in plan.prefills] == ["c0"]  # budget for all three, yet one
    sched.update(plan, ex.run(plan))
    plan = sched.schedule()
    assert sorted(c.request_id for c in plan.prefills) == ["c1", "c2"]
    assert all(c.start == 64 for c in plan.prefills)  # only the tail: 4 pages from the cache
    sched.update(plan, ex.run(plan))
    _, finals = serve(sched, ex, {})
    assert finals["c1"].usage.cached_prompt_tokens == finals["c2"].usage.cached_prompt_tokens == 64
    # A first that ends before its prefill lets the others go.
    sched, ex = make()
    sched.add("d0", shared, params, seed=0)
    sched.add("d1", shared, params, seed=1, after="d0")
    sched.abort("d0")
    plan = sched.schedule()
    assert [c.request_id for c in plan.prefills] == ["d1"]
    sched, ex = make(enable_prefix_cache=False, max_prefill_tokens=256)
    sched.add("e0", shared, params, seed=0)
    sched.add("e1", shared, params, seed=1, after="e0")
    assert [c.request_id for c in sched.schedule().prefills] == ["e0", "e1"]


def test_running_requests_share_prefix_pages_read_only():
    shared = prompt(70, 1)
    a = ("a", shared, SamplingParams(max_tokens=30, ignore_eos=True))
    b = ("b", shared[:64] + [5, 6], SamplingParams(max_tokens=10, ignore_eos=True))
    sched, ex = make()
    streams, finals = serve(sched, ex, {0: [a], 3: [b]})
    assert streams == expected({0: [a], 3: [b]})
    assert finals["b"].usage.cached_prompt_tokens == 64 and ex.prefilled["b"] == 2
    rows = {}  # request -> its first page-table row
    for plan in ex.plans:
        for assignment in plan.assignments:
            rows[assignment.request_id] = plan.page_table_updates[assignment.slot]
    assert rows["a"][:4] == rows["b"][:4] and rows["a"][4] != rows["b"][4]


def test_readmission_recomputes_only_what_its_cached_pages_miss():
    """B outgrows the pool right after its 2nd page filled and preempts itself; it comes back
    with 33 known tokens, 32 of them in its own cached pages: only the last one is prefilled,
    and it must sample (not decode: the device no longer holds B's last token)."""
    a = ("a", prompt(16, 1), SamplingParams(max_tokens=16, ignore_eos=True))
    b = ("b", prompt(31, 2), SamplingParams(max_tokens=33, ignore_eos=True))
    sched, ex = make(num_slots=2, num_pages=5, max_model_len=64, decode_steps=1)
    streams, finals = serve(sched, ex, {0: [a, b]})
    assert streams == expected({0: [a, b]})
    assert finals["b"].usage.num_preemptions == 1 and finals["b"].usage.cached_prompt_tokens == 0
    assert ex.prefilled["b"] == 31 + 1


def test_follow_up_turn_shares_only_pages_whose_kv_is_written():
    """A prompt containing a running request's output (a follow-up turn) may share that
    request's pages only once every token in them has K/V: with decode_steps=1, a's second page
    is full of known tokens one step before its last position is written."""
    a_prompt = prompt(31, 1)
    a_params = SamplingParams(max_tokens=20, ignore_eos=True)
    follow = a_prompt + reference(a_prompt, a_params)[:1] + [7, 8, 9]
    sched, ex = make(decode_steps=1)
    arrivals = {0: [("a", a_prompt, a_params)],
                1: [("b", follow, SamplingParams(max_tokens=4, ignore_eos=True))]}
    streams, finals = serve(sched, ex, arrivals)
    assert streams == expected(arrivals)
    assert finals["b"].usage.cached_prompt_tokens == 16


def test_page_isolation_checker_catches_a_foreign_page():
    """The executor's isolation check is live: pointing a slot at another's page fails."""
    sched, ex = make()
    sched.add("a", prompt(20, 1), SamplingParams(max_tokens=8), seed=0)
    sched.add("b", prompt(20, 2), SamplingParams(max_tokens=8), seed=0)
    step(sched, ex)
    plan = sched.schedule()
    bad = dataclasses.replace(plan, page_table_updates={1: ex.rows[0]})
    with pytest.raises(AssertionError, match="another slot|foreign"):
        ex.run(bad)


def test_freed_pages_are_poisoned_and_never_read():
    arrivals = mixed_load(16)
    sched, ex = make(num_pages=12, num_slots=4, decode_steps=3, max_prefill_tokens=20)
    streams, _ = serve(sched, ex, arrivals)
    assert streams == expected(arrivals)
    assert ex.poisoned > 0 and ex.reads > 0 and sched.num_preemptions > 0


def test_decode_lookahead_allocates_only_kept_positions():
    # 14 + 2 = 16 tokens fit one page; k=4 writes positions 14..17, 16 and 17 in the null page.
    sched, ex = make(decode_steps=4)
    streams, _ = serve(sched, ex, {0: [("a", prompt(14, 3), SamplingParams(max_tokens=2,
                                                                          ignore_eos=True))]})
    assert streams["a"] == reference(prompt(14, 3), SamplingParams(max_tokens=2, ignore_eos=True))
    assert all(len(row) <= 1 for plan in ex.plans for row in plan.page_table_updates.values())


def test_stop_inside_a_decode_column_discards_the_rest():
    p = prompt(10, 5)
    want = reference(p, SamplingParams(max_tokens=30, ignore_eos=True))
    params = SamplingParams(max_tokens=30, stop_token_ids=(want[6],), ignore_eos=True)
    sched, ex = make(decode_steps=4)
    streams, finals = serve(sched, ex, {0: [("a", p, params)]})
    assert streams["a"] == want[:want.index(want[6]) + 1]
    assert finals["a"].finish_reason == "stop" and str(want[6]) in finals["a"].detail


def test_logprobs_are_passed_through_when_asked():
    events = []
    sched, ex = make(decode_steps=3)
    sched.add("a", [5, 6], SamplingParams(max_tokens=7, logprobs=2), seed=0)
    sched.add("b", [5, 6], SamplingParams(max_tokens=7), seed=0)
    while sched.has_work():
        events += step(sched, ex)[1]
    for event in events:
        if event.request_id == "b":
            assert event.logprobs is None
            continue
        assert [lp.token_id for lp in event.logprobs] == list(event.token_ids)
        for token, logprob, top in event.logprobs:
            assert logprob == -token / 100 and len(top) == 2
            nxt = (token + 1) % V
            assert top == ((token, -token / 100 - 1), (nxt, -nxt / 100 - 1))


def test_queue_bound_rejects_and_enqueues_nothing():
    sched, _ = make(max_waiting=2)
    sched.add("a", [1], SamplingParams(), seed=0)
    sched.add("b", [1], SamplingParams(), seed=0)
    with pytest.raises(QueueFullError, match="max_waiting=2"):
        sched.add("c", [1], SamplingParams(), seed=0)
    assert sched.num_waiting == 2 and not sched.abort("c")


def test_priority_orders_admission_and_ties_keep_arrival_order():
    sched, ex = make(num_slots=1)
    long = SamplingParams(max_tokens=6, ignore_eos=True)
    arrivals = {0: [("first", prompt(5, 0), long)],
                1: [(rid, prompt(5, i + 1), dataclasses.replace(long, priority=p))
                    for i, (rid, p) in enumerate([("late", 5), ("b1", 0), ("urgent", -3),
                                                  ("b2", 0)])]}
    streams, _ = serve(sched, ex, arrivals)
    admitted = [a.request_id for plan in ex.plans for a in plan.assignments]
    assert admitted == ["first", "urgent", "b1", "b2", "late"]
    assert streams == expected(arrivals)


def test_preempted_request_goes_ahead_of_its_priority_but_behind_more_urgent_ones():
    # 12 usable pages, 2 slots: two growing requests cannot both finish without a preemption.
    sched, ex = make(num_slots=2, num_pages=13, decode_steps=4, max_prefill_tokens=64)
    grow = SamplingParams(max_tokens=90, ignore_eos=True)
    sched.add("old", prompt(30, 1), grow, seed=0)
    sched.add("new", prompt(30, 2), grow, seed=0)
    step(sched, ex)
    sched.add("same", prompt(3, 3), SamplingParams(max_tokens=2), seed=0)
    sched.add("urgent", prompt(3, 4), SamplingParams(max_tokens=2, priority=-1), seed=0)
    while sched.num_preemptions == 0:
        step(sched, ex)
    assert sched.waiting_ids() == ("urgent", "new", "same")


def test_add_validation_names_field_value_and_limit():
    sched, _ = make(max_model_len=32, num_pages=3)
    with pytest.raises(ValueError, match=r"prompt_ids=\[\]"):
        sched.add("a", [], SamplingParams(), seed=0)
    with pytest.raises(ValueError, match=r"len\(prompt_ids\)=20 \+ max_tokens=16 = 36: exceeds "
                                         r"max_model_len=32"):
        sched.add("a", [1] * 20, SamplingParams(max_tokens=16), seed=0)
    sched.add("a", [1], SamplingParams(), seed=0)
    with pytest.raises(ValueError, match="request_id='a'"):
        sched.add("a", [1], SamplingParams(), seed=0)
    assert sched.num_waiting == 1


@pytest.mark.parametrize("field,value,message", [
    ("page_size", 24, "page_size=24: must be a positive multiple of 16"),
    ("num_slots", 0, "num_slots=0: must be an integer >= 1"),
    ("num_pages", 8, r"num_pages=8: must be >= 9 \(the null page \+ 8 pages for one request of "
                     r"max_model_len=128\)"),
    ("decode_steps", 0, "decode_steps=0"),
    ("model_stop_ids", {-1}, "model_stop_ids"),
])
def test_config_validation(field, value, message):
    fields = dict(num_slots=2, num_pages=40, max_model_len=128, page_size=16, max_waiting=8,
                  max_prefill_tokens=64, decode_steps=1, enable_prefix_cache=True)
    with pytest.raises(ValueError, match=message):
        SchedulerConfig(**{**fields, field: value})


def test_abort_frees_slot_and_pages_at_the_next_step():
    sched, ex = make(num_slots=1)
    sched.add("a", prompt(40, 1), SamplingParams(max_tokens=50), seed=0)
    sched.add("w", prompt(5, 2), SamplingParams(max_tokens=5), seed=0)
    step(sched, ex)
    _, events = step(sched, ex)
    assert sched.num_free_slots == 0 and sched.num_pages_used == 3
    assert sched.abort("a") and sched.abort("w") and not sched.abort("zz")
    plan = sched.schedule()
    # Nothing left to run: an empty plan, which needs no update and carries nothing for the
    # device; the final events are taken directly.
    assert plan.empty and not plan.freed_slots and not plan.page_table_updates
    events = sched.take_finished_events()
    assert {e.request_id: e.finish_reason for e in events} == {"a": "abort", "w": "abort"}
    final = {e.request_id: e for e in events}
    assert final["a"].usage.completion_tokens == 3 and final["w"].usage.queue_time is None
    assert sched.num_free_slots == 1 and sched.num_pages_used == 0 and not sched.has_work()
    # The released row goes out with the next plan that has work.
    sched.add("n", prompt(5, 3), SamplingParams(max_tokens=2), seed=0)
    plan, _ = step(sched, ex)
    assert plan.assignments[0].slot == 0 and len(plan.page_table_updates[0]) == 1


def test_deadline_expires_running_and_waiting_requests():
    clock = FakeClock()
    sched, ex = make(clock=clock, num_slots=1)
    sched.add("a", prompt(10, 1), SamplingParams(max_tokens=50), seed=0, deadline=clock.now + 1)
    sched.add("b", prompt(10, 2), SamplingParams(max_tokens=50), seed=0, deadline=clock.now + 2)
    sched.add("c", prompt(10, 3), SamplingParams(max_tokens=3), seed=0)
    sched.add("d", prompt(10, 4), SamplingParams(max_tokens=3), seed=0, deadline=clock.now + 1)
    step(sched, ex)
    assert sched.num_pages_used == 1
    clock.now += 1.5
    plan, events = step(sched, ex)  # a (running) and d (waiting) expire; b takes a's slot
    ended = {e.request_id: e for e in events if e.finished}
    assert sorted(ended) == ["a", "d"] and plan.assignments[0].request_id == "b"
    assert all(e.finish_reason == "abort" and "deadline" in e.detail for e in ended.values())
    assert ended["d"].usage.queue_time is None and ended["a"].usage.queue_time == 0
    clock.now += 1
    plan, events = step(sched, ex)
    assert [(e.request_id, e.finish_reason) for e in events if e.finished] == [("b", "abort")]
    assert plan.assignments[0].request_id == "c" and sched.num_pages_used == 1
    while sched.has_work():
        step(sched, ex)
    assert sched.num_pages_used == 0 and sched.num_free_slots == 1


def test_finish_for_a_stop_string_and_the_final_usage():
    clock = FakeClock()
    sched, ex = make(clock=clock, num_slots=1, decode_steps=2)
    sched.add("x", prompt(30, 1), SamplingParams(max_tokens=4, ignore_eos=True), seed=0)
    sched.add("y", prompt(20, 2), SamplingParams(max_tokens=40, ignore_eos=True), seed=0)
    clock.now += 0.5
    step(sched, ex)  # x: prefill + first token
    clock.now += 0.25
    events = step(sched, ex)[1] + step(sched, ex)[1]  # x: 2 + 1 tokens, finished by length
    x = events[-1]
    assert x.finish_reason == "length" and x.usage.completion_tokens == 4
    assert x.usage.prompt_tokens == 30 and x.usage.cached_prompt_tokens == 0
    assert x.usage.queue_time == 0.5 and x.usage.time_to_first_token == 0.5
    clock.now += 1
    step(sched, ex)  # y admitted at arrival + 1.75
    with pytest.raises(ValueError, match="reason='length'"):
        sched.finish("y", "length")
    y = sched.finish("y", "stop", "stop string 'END'")  # ends now, the event comes back
    assert (y.finish_reason, y.detail, y.token_ids) == ("stop", "stop string 'END'", ())
    assert y.usage.queue_time == pytest.approx(1.75) and y.usage.completion_tokens == 1
    assert sched.finish("y", "stop") is None and sched.num_pages_used == 0
    assert not sched.has_work() and sched.take_finished_events() == []


def test_finish_with_error_after_a_failed_device_step():
    """The engine's path when execute() raises: it ends the plan's requests with "error" and
    goes on; the dead plan needs no update, and nothing of it is applied."""
    sched, ex = make(num_slots=2)
    sched.add("a", prompt(20, 1), SamplingParams(max_tokens=9), seed=0)
    step(sched, ex)
    sched.add("b", prompt(30, 2), SamplingParams(max_tokens=9), seed=0)
    sched.add("c", prompt(5, 3), SamplingParams(max_tokens=9), seed=0)
    plan = sched.schedule()
    assert plan.decode_slots == (0,) and [c.request_id for c in plan.prefills] == ["b"]
    with pytest.raises(RuntimeError, match="in flight"):
        sched.schedule()
    ids = sorted({c.request_id for c in plan.prefills} | set(sched.running_ids()))
    events = [sched.finish(i, "error", "device step failed") for i in ids]
    assert [(e.request_id, e.finish_reason, e.detail) for e in events] == [
        ("a", "error", "device step failed"), ("b", "error", "device step failed")]
    sched.check_invariants()
    assert sched.num_pages_used == 0
    streams, finals = serve(sched, ex, {})
    assert streams["c"] == reference(prompt(5, 3), SamplingParams(max_tokens=9))


def test_finish_while_a_step_is_in_flight_drops_its_tokens():
    sched, ex = make(num_slots=3)
    sched.add("a", prompt(20, 1), SamplingParams(max_tokens=9), seed=0)
    sched.add("b", prompt(40, 2), SamplingParams(max_tokens=9), seed=0)
    sched.add("c", prompt(40, 3), SamplingParams(max_tokens=9), seed=0)
    step(sched, ex)
    plan = sched.schedule()
    assert [c.request_id for c in plan.prefills] == ["c"]
    output = ex.run(plan)
    assert sched.finish("a", "error", "detokenizer failed").finish_reason == "error"
    assert sched.finish("c", "stop").finish_reason == "stop"
    sched.add("c", prompt(3, 4), SamplingParams(max_tokens=2), seed=0)  # the id, reused
    events = sched.update(plan, output)
    assert [e.request_id for e in events] == ["b"]
    sched.check_invariants()
    streams, _ = serve(sched, ex, {})
    assert streams["c"] == reference(prompt(3, 4), SamplingParams(max_tokens=2))


def test_schedule_and_update_must_alternate():
    sched, ex = make()
    sched.add("a", [1, 2], SamplingParams(), seed=0)
    plan = sched.schedule()
    with pytest.raises(RuntimeError, match="in flight"):
        sched.schedule()
    output = ex.run(plan)
    with pytest.raises(RuntimeError, match="not the one in flight"):
        sched.update(dataclasses.replace(plan, step=99), output)
    sched.update(plan, output)
    with pytest.raises(RuntimeError, match="not the one in flight"):
        sched.update(plan, output)  # twice


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_add_abort_step_keeps_page_invariants(data):
    """Random adds (sharing prefixes, some with deadlines), aborts, engine-side finishes and
    steps on a tiny pool: invariants hold after every step, every kept token is exact, and at
    the end no page is held by anyone."""
    draw = data.draw
    clock = FakeClock()  # one second per step
    sched, ex = make(clock=clock, num_slots=draw(st.integers(1, 4)),
                     num_pages=draw(st.integers(5, 10)), max_model_len=64,
                     max_waiting=draw(st.integers(1, 8)),
                     max_prefill_tokens=draw(st.integers(1, 40)),
                     decode_steps=draw(st.integers(1, 4)),
                     enable_prefix_cache=draw(st.booleans()))
    stem = prompt(48, 0)
    added, streams, finals = {}, collections.defaultdict(list), {}
    ops = draw(st.lists(st.sampled_from(["add"] * 3 + ["step"] * 3 + ["abort", "finish"]),
                        min_size=5, max_size=40))

    def record(events):
        for e in events:
            assert e.request_id not in finals
            streams[e.request_id] += e.token_ids
            if e.finished:
                finals[e.request_id] = e

    for op in ops:
        if op == "add":
            p = (stem[:draw(st.sampled_from([0, 5, 16, 20, 32, 40]))]
                 + draw(st.lists(st.integers(1, V - 1), max_size=8))) or [1]
            params = SamplingParams(max_tokens=draw(st.integers(1, 64 - len(p))),
                                    ignore_eos=draw(st.booleans()),
                                    priority=draw(st.sampled_from([0, 0, -1, 2])))
            deadline = draw(st.none() | st.integers(1, 30).map(lambda d: clock.now + d))
            rid = f"r{len(added)}"
            try:
                sched.add(rid, p, params, seed=0, deadline=deadline)
                added[rid] = (p, params)
            except QueueFullError:
                assert sched.num_waiting >= sched.config.max_waiting
        elif op == "abort" and added:
            sched.abort(draw(st.sampled_from(sorted(added))))
        elif op == "finish" and added:
            record([e for e in [sched.finish(draw(st.sampled_from(sorted(added))), "stop")] if e])
        else:
            record(step(sched, ex)[1])
            clock.now += 1
    for _ in range(2000):
        if not sched.has_work():
            break
        record(step(sched, ex)[1])
    assert not sched.has_work()
    assert set(finals) == set(added)
    for rid, (p, params) in added.items():
        want = reference(p, params)
        if finals[rid].finish_reason in ("abort", "stop") and len(streams[rid]) < len(want):
            assert streams[rid] == want[:len(streams[rid])]
        else:
            assert streams[rid] == want
        assert finals[rid].usage.completion_tokens == len(streams[rid])
    sched.check_invariants()
    sched.allocator.check_invariants([])
    assert sched.num_pages_used == 0
    assert sched.allocator.num_free + sched.allocator.num_cached == sched.config.num_pages - 1


def test_importing_the_scheduler_does_not_import_jax():
    code = ("import sys, jaxgen.scheduler, jaxgen.scheduler.scheduler; "
            "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


class Pipelined:
    """One engine step as the engine runs it with look-ahead: while one plan is in flight the
    next decode step is planned (`schedule_ahead`) and launched before the older one is
    updated. The executor runs each plan when it is launched, as the device would."""

    def __init__(self, stop_string_rate: float = 0.0):
        self.pending, self.ahead, self.admitted_ahead = [], 0, 0
        # As the engine does when a stop string matches on text: finish a running request
        # while its steps are in flight.
        self.stop_string_rate, self.rng = stop_string_rate, np.random.default_rng(3)
        self.stopped: set[str] = set()

    def _launch(self, sched, ex, plan):
        ex.poison(sched.allocator.free_pages())
        self.pending.append((plan, ex.run(plan)))

    def __call__(self, sched, ex):
        if not self.pending:
            plan = sched.schedule()
            if plan.empty:
                return sched.take_finished_events()
            self._launch(sched, ex, plan)
        plan = sched.schedule_ahead()
        if plan is not None:
            self.ahead += 1
            self.admitted_ahead += len(plan.assignments)
            self._launch(sched, ex, plan)
        events = []
        running = sched.running_ids()
        if running and self.rng.random() < self.stop_string_rate:
            rid = running[int(self.rng.integers(len(running)))]
            self.stopped.add(rid)
            events.append(sched.finish(rid, "stop", "stop string"))
        events += sched.update(*self.pending.pop(0))
        sched.check_invariants()
        return events


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_decode_ahead_pipeline_equals_each_request_alone(decode_steps):
    """Planning each decode step before the previous one's tokens are known changes no token:
    requests that stop inside the in-flight step lose only the look-ahead tokens, their pages
    are poisoned once freed and never read, and arrivals still get admitted."""
    arrivals = mixed_load(14)
    sched, ex = make(decode_steps=decode_steps, max_prefill_tokens=24)
    piped = Pipelined()
    streams, finals = serve(sched, ex, arrivals, stepper=piped)
    assert streams == expected(arrivals) and not piped.pending
    assert piped.ahead > 3, "the pipeline never looked ahead"
    assert all(len(f.token_ids) <= 40 for f in finals.values())


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_a_request_id_reused_while_its_old_step_is_in_flight_gets_none_of_its_tokens(phase):
    """Same id, same slot: only the request's serial tells the old one's in-flight tokens
    from the new one's."""
    sched, ex = make(num_slots=1, decode_steps=2, max_prefill_tokens=8)
    sched.add("c", prompt(20 if phase == "prefill" else 5, 1),
              SamplingParams(max_tokens=20, ignore_eos=True), seed=0)
    if phase == "decode":
        step(sched, ex)
    plan = sched.schedule()  # the old "c": a prompt chunk, or a decode step
    output = ex.run(plan)
    sched.finish("c", "stop", "stop string")
    sched.add("c", prompt(4, 2), SamplingParams(max_tokens=5), seed=0)  # the id, reused
    ahead = sched.schedule_ahead()
    assert [(a.request_id, a.slot) for a in ahead.assignments] == [("c", 0)]
    assert sched.update(plan, output) == []
    first = [t for e in sched.update(ahead, ex.run(ahead)) for t in e.token_ids]
    sched.check_invariants()
    streams, _ = serve(sched, ex, {})
    assert first + streams.get("c", []) == reference(prompt(4, 2), SamplingParams(max_tokens=5))


def test_ahead_admission_with_stop_strings_ending_requests_in_flight():
    """Requests admitted while a step is in flight, and requests the engine ends (stop strings)
    while theirs are: every stream is its reference (cut short where it was stopped)."""
    arrivals = mixed_load(24)
    sched, ex = make(num_slots=4, decode_steps=3, max_prefill_tokens=24)
    piped = Pipelined(stop_string_rate=0.15)
    streams, finals = serve(sched, ex, arrivals, stepper=piped)
    want = expected(arrivals)
    assert piped.stopped and piped.admitted_ahead > 10, (piped.stopped, piped.admitted_ahead)
    for rid, tokens in want.items():
        if rid in piped.stopped:
            assert finals[rid].finish_reason == "stop" and streams.get(rid, []) == \
                tokens[:len(streams.get(rid, []))]
        else:
            assert streams[rid] == tokens, rid


def test_decode_ahead_with_a_short_pool_and_an_abort():
    arrivals = {0: [(f"r{i}", prompt(20 + 3 * i, i), SamplingParams(max_tokens=60, ignore_eos=True))
                    for i in range(6)]}
    sched, ex = make(num_slots=4, num_pages=13, decode_steps=4, max_prefill_tokens=48)
    piped = Pipelined()
    streams, finals = serve(sched, ex, arrivals, stepper=piped, abort_at={9: "r1"})
    want = expected(arrivals)
    assert finals["r1"].finish_reason == "abort"
    assert streams["r1"] == want["r1"][:len(streams["r1"])]
    assert all(streams[r] == want[r] for r in want if r != "r1")
    assert sched.num_preemptions > 0 and piped.ahead > 0


def test_schedule_ahead_continues_prompts_admits_and_decodes():
    sched, ex = make(num_slots=2, decode_steps=2, max_prefill_tokens=4)
    sched.add("a", prompt(6, 1), SamplingParams(max_tokens=20, ignore_eos=True), seed=0)
    plan = sched.schedule()  # the prompt's first chunk
    assert not plan.prefills[0].sample
    ahead = sched.schedule_ahead()  # its second chunk, from where the one in flight ends
    assert ahead.prefills[0].start == 4 and ahead.prefills[0].sample and not ahead.decode_slots
    assert sched.schedule_ahead() is None  # one look-ahead at a time
    sched.update(plan, ex.run(plan))
    second = sched.schedule_ahead()  # the last chunk samples the first token: decode follows
    assert second.decode_slots == (ahead.prefills[0].slot,) and second.decode_positions == (6,)
    sched.update(ahead, ex.run(ahead))
    sched.add("b", prompt(5, 2), SamplingParams(max_tokens=3), seed=0)
    third = sched.schedule_ahead()  # "b" is admitted into the free slot while "a" decodes on
    assert [a.request_id for a in third.assignments] == ["b"]
    assert third.decode_slots == second.decode_slots and third.prefills[0].token_ids == \
        tuple(prompt(5, 2)[:4])
    sched.update(second, ex.run(second))
    sched.abort("a")
    assert sched.schedule_ahead() is None  # an abort is due: schedule() applies it first
    sched.update(third, ex.run(third))
    plan = sched.schedule()
    assert [c.request_id for c in plan.prefills] == ["b"] and plan.prefills[0].start == 4
    sched.update(plan, ex.run(plan))
    sched.check_invariants()


def test_a_slot_freed_in_flight_is_reused_ahead_without_taking_its_tokens():
    """A slot the engine freed while its step is in flight (a stop string matched) goes to the
    next request at once; the in-flight step's tokens for that slot still go to nobody."""
    sched, ex = make(num_slots=2, decode_steps=2, max_prefill_tokens=16)
    for i, rid in enumerate("ab"):
        sched.add(rid, prompt(5, i), SamplingParams(max_tokens=20, ignore_eos=True), seed=0)
    step(sched, ex)  # both prompts whole: both decode next
    plan = sched.schedule()
    assert len(plan.decode_slots) == 2
    output = ex.run(plan)
    sched.finish("b", "stop", "stop string 'x'")
    sched.add("c", prompt(4, 3), SamplingParams(max_tokens=5), seed=0)
    ahead = sched.schedule_ahead()
    b_slot = ({s for s in plan.decode_slots} - set(ahead.decode_slots)).pop()
    assert [(a.request_id, a.slot) for a in ahead.assignments] == [("c", b_slot)]
    events = sched.update(plan, output)
    assert {e.request_id for e in events} == {"a"}  # b's tokens of the step went to nobody
    first = [t for e in sched.update(ahead, ex.run(ahead)) if e.request_id == "c"
             for t in e.token_ids]
    sched.check_invariants()
    streams, _ = serve(sched, ex, {})
    assert first + streams["c"] == reference(prompt(4, 3), SamplingParams(max_tokens=5))
