"""Overload and tenant isolation in the scheduler (no device; the fake executor of
test_scheduler.py): a more urgent arrival displaces the newest of the least urgent waiting
requests instead of being refused; requests waiting past max_queue_time are shed; neither ever
sheds a request that was already scheduled; prefix-cache salts keep tenants' pages apart."""

from __future__ import annotations

import dataclasses

import pytest

from jaxgen.request_stream import RequestOutput
from jaxgen.sampling_params import SamplingParams
from jaxgen.scheduler import QueueFullError
from jaxgen.scheduler.page_allocator import PageAllocator, salted_root
from tests.test_scheduler import FakeClock, make, prompt, reference, serve, step

LONG = SamplingParams(max_tokens=40, ignore_eos=True)


def finals(events):
    return {e.request_id: e for e in events if e.finished}


def test_a_more_urgent_arrival_displaces_the_newest_of_the_least_urgent():
    sched, ex = make(num_slots=1, max_waiting=3)
    sched.add("running", prompt(5, 0), LONG, seed=0)
    step(sched, ex)
    for rid, priority in [("low-old", 5), ("mid", 1), ("low-new", 5)]:
        sched.add(rid, prompt(5, hash(rid) % 100), dataclasses.replace(LONG, priority=priority),
                  seed=0)
    # Equal urgency never displaces: refused, nothing changes.
    with pytest.raises(QueueFullError, match="max_waiting=3"):
        sched.add("late", prompt(5, 9), dataclasses.replace(LONG, priority=5), seed=0)
    sched.add("urgent", prompt(5, 8), dataclasses.replace(LONG, priority=0), seed=0)
    assert sched.waiting_ids() == ("urgent", "mid", "low-old") and sched.num_displaced == 1
    _, events = step(sched, ex)
    shed = finals(events)["low-new"]
    assert shed.finish_reason == "abort" and shed.usage.queue_time is None
    assert "displaced" in shed.detail and "max_waiting=3" in shed.detail
    out = RequestOutput("low-new", (), "", None, shed.finish_reason, shed.detail)
    assert out.outcome == "shed"  # front ends: RESOURCE_EXHAUSTED / 429
    sched.check_invariants()


def test_a_preempted_request_waiting_again_is_never_displaced():
    # 12 usable pages, 2 slots: the two growing requests preempt one another.
    sched, ex = make(num_slots=2, num_pages=13, decode_steps=4, max_prefill_tokens=64,
                     max_waiting=2)
    grow = SamplingParams(max_tokens=90, ignore_eos=True, priority=3)
    sched.add("old", prompt(30, 1), grow, seed=0)
    sched.add("new", prompt(30, 2), grow, seed=0)
    while sched.num_preemptions == 0:
        step(sched, ex)
    sched.add("queued", prompt(3, 3), grow, seed=0)
    assert sched.waiting_ids() == ("new", "queued")
    urgent = SamplingParams(max_tokens=2, priority=-5)
    sched.add("urgent", prompt(3, 4), urgent, seed=0)  # displaces "queued", never "new"
    assert sched.waiting_ids() == ("urgent", "new") and sched.num_displaced == 1
    with pytest.raises(QueueFullError):  # "new" has streamed tokens: it is not shed
        sched.add("urgent2", prompt(3, 5), urgent, seed=0)
    sched.check_invariants()


def test_requests_waiting_past_max_queue_time_are_shed_and_scheduled_ones_are_not():
    clock = FakeClock()
    sched, ex = make(clock=clock, num_slots=1, max_queue_time=2.0)
    sched.add("a", prompt(5, 1), LONG, seed=0)
    step(sched, ex)
    sched.add("b", prompt(5, 2), LONG, seed=0)
    clock.now += 1.5
    sched.add("c", prompt(5, 3), LONG, seed=0)
    clock.now += 1.0  # b waited 2.5s, c 1s; a runs (scheduled at once)
    _, events = step(sched, ex)
    ended = finals(events)
    assert list(ended) == ["b"] and "max_queue_time=2s" in ended["b"].detail
    assert ended["b"].usage.queue_time is None and sched.num_queue_timeouts == 1
    assert RequestOutput("b", (), "", None, "abort", ended["b"].detail).outcome == "shed"
    clock.now += 10.0  # a still runs: it was scheduled, so it is never shed
    _, events = step(sched, ex)
    assert list(finals(events)) == ["c"] and sched.num_running == 1


def test_the_wait_before_an_engine_restart_counts_as_queue_time():
    clock = FakeClock()
    sched, ex = make(clock=clock, max_queue_time=5.0)
    sched.add("kept", prompt(5, 1), SamplingParams(max_tokens=2), seed=0, arrival=clock.now - 9)
    _, events = step(sched, ex)
    assert "waited 9.0s" in finals(events)["kept"].detail


def test_displacement_and_queue_time_keep_every_other_stream_exact():
    clock = FakeClock()
    sched, ex = make(clock=clock, num_slots=2, max_waiting=2, max_queue_time=2.0)
    arrivals = {0: [(f"r{i}", prompt(8, i), dataclasses.replace(LONG, max_tokens=6 + i))
                    for i in range(2)]}
    added = {rid: (p, params) for rid, p, params in arrivals[0]}

    def stepper(s, e):  # keeps the queue full for a while, with mixed priorities
        clock.now += 0.5
        n = len(added)
        if n < 40:
            params = dataclasses.replace(LONG, max_tokens=8 + n % 8, priority=n % 4)
            try:
                s.add(f"x{n}", prompt(8, n), params, seed=0)
                added[f"x{n}"] = (prompt(8, n), params)
            except QueueFullError:
                added[f"refused{n}"] = None
        return step(s, e)[1]

    streams, ended = serve(sched, ex, arrivals, stepper=stepper)
    done = {rid for rid, e in ended.items() if e.finish_reason == "length"}
    shed = {rid: e.detail for rid, e in ended.items() if e.detail.startswith("shed")}
    assert done | set(shed) == set(ended)
    assert any("displaced" in d for d in shed.values())
    assert any("max_queue_time" in d for d in shed.values())
    assert sched.num_displaced + sched.num_queue_timeouts == len(shed)
    for rid in done:
        assert streams[rid] == reference(*added[rid])


def test_salted_chains_share_no_pages_and_each_salt_hits_its_own():
    alloc = PageAllocator(num_pages=20, page_size=16)
    ids = list(range(64))
    roots = {salt: salted_root(salt) for salt in ("", "key:a", "key:b")}
    assert len(set(roots.values())) == 3
    held = {}
    for salt, root in roots.items():
        assert alloc.lookup_prefix(ids, root) == []
        held[salt] = alloc.allocate(4)
        alloc.register_full_pages(ids, held[salt], root=root)
    for salt, root in roots.items():
        assert alloc.match_prefix(ids, root) == held[salt]  # its own pages, nobody else's
    assert len({p for pages in held.values() for p in pages}) == 12


def test_requests_of_two_salts_prefill_the_same_prompt_twice_and_of_one_salt_once():
    sched, ex = make(num_slots=4)
    shared = prompt(48, 7)
    for rid, salt in [("a1", "tenant-a"), ("b1", "tenant-b")]:
        sched.add(rid, shared, SamplingParams(max_tokens=2, cache_salt=salt), seed=0)
    while sched.has_work():
        step(sched, ex)
    assert ex.prefilled["a1"] == ex.prefilled["b1"] == 48
    sched.add("a2", shared, SamplingParams(max_tokens=2, cache_salt="tenant-a"), seed=0)
    sched.add("c1", shared, SamplingParams(max_tokens=2, cache_salt="tenant-c"), seed=0)
    while sched.has_work():
        step(sched, ex)
    assert ex.prefilled["a2"] == 16 and ex.prefilled["c1"] == 48  # 2 cached pages: a2 only


def test_an_engine_sheds_requests_waiting_past_max_queue_time():
    """--max-queue-time end to end in an engine (tiny model, one slot): the request behind a
    long one ends shed, and the long one runs on."""
    from jaxgen.models import Model
    from tests.helpers import TINY_LLAMA, ByteTokenizer, engine_for

    model = Model(TINY_LLAMA)
    engine = engine_for(model, model.init_random(seed=3), ByteTokenizer(), num_slots=1,
                        max_queue_time_s=0.5)
    engine.start()
    try:
        first = engine.add_request([1, 2, 3], SamplingParams(max_tokens=40, temperature=0,
                                                             ignore_eos=True))
        second = engine.add_request([4, 5, 6], SamplingParams(max_tokens=4, temperature=0))
        shed = second.result()
        assert shed.finish_reason == "abort" and "max_queue_time=0.5s" in shed.detail
        assert not shed.token_ids and shed.usage.queue_time is None
        assert first.result().finish_reason == "length"
        assert engine.stats().num_queue_timeouts == 1
    finally:
        engine.stop()


def test_the_cache_salt_of_each_scope():
    from jaxgen.config import ConfigError, ServerConfig
    from jaxgen.sampling_params import cache_salt

    assert cache_salt("global", "key-1", "") == ""  # shared by everyone
    one, two = cache_salt("key", "key-1", ""), cache_salt("key", "key-2", "")
    assert one != two and one == cache_salt("key", "key-1", "") and "key-1" not in one
    assert cache_salt("request", "key-1", "") != cache_salt("request", "key-1", "")
    assert len({one, cache_salt("key", "key-1", "a"), cache_salt("key", "key-1", "b")}) == 3
    assert cache_salt("global", None, "a") == cache_salt("global", "key-2", "a")
    with pytest.raises(ValueError, match="cache_salt=<257 characters>: at most 256"):
        cache_salt("global", None, "x" * 257)
    assert ServerConfig().cache_scope == "global"
    assert ServerConfig(api_keys=("k",)).cache_scope == "key"
    with pytest.raises(ConfigError, match="prefix_cache_scope='key': needs API keys"):
        ServerConfig(prefix_cache_scope="key")


def test_the_restart_breaker_allows_the_limit_within_the_window_and_backs_off():
    from jaxgen.server.restart_breaker import RestartBreaker

    clock = FakeClock()
    breaker = RestartBreaker(3, window_s=600, clock=clock)
    delays = []
    for _ in range(3):
        assert breaker.allow()
        delays.append(breaker.backoff_s())
        clock.now += 10
    assert delays == [0.0, 0.5, 1.0] and not breaker.allow()  # the fourth within 10 minutes
    assert "3 restart(s) within 600s (--max-engine-restarts=3)" in breaker.describe()
    clock.now += 575  # the first one leaves the window
    assert breaker.allow() and breaker.backoff_s() == 1.0 and breaker.total == 4
    assert not RestartBreaker(0).allow()  # 0: never restart
