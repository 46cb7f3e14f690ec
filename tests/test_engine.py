"""The engine end to end on tiny random models: continuous batching equals a naive full-forward
greedy decode; seeds ignore batch mates; prefix cache, preemption, aborts, deadlines, stop
strings, logprobs, poisoned freed pages, failure isolation, no compilation after warm-up."""

import time

import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.config import EngineConfig
from jaxgen.engine import Engine
from jaxgen.engine_api import EngineObserver, QueueFullError
from jaxgen.models import Model, base
from jaxgen.sampling_params import SamplingParams
from tests.helpers import TINY_GEMMA3, TINY_LLAMA, ByteTokenizer, engine_for, naive_greedy

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module", params=[TINY_GEMMA3, TINY_LLAMA], ids=["gemma3", "llama"])
def tiny(request):
    """Both architectures: for what the model's layers could change (output against the naive
    decode, with preemption, the prefix cache and reused pages)."""
    model = Model(request.param)
    return model, model.init_random(seed=11)


@pytest.fixture(scope="module")
def tiny1():
    """One architecture (Gemma 3's, with its sliding window), for the engine's own mechanics
    past the logits: the loop, launch-ahead, failures, aborts, queues, observers."""
    model = Model(TINY_GEMMA3)
    return model, model.init_random(seed=11)


def make_engine(tiny, **runner):
    return engine_for(*tiny, ByteTokenizer(), warmup=True, **runner)


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 256, int(rng.integers(1, 60))).tolist() for _ in range(n)]


def expected(tiny, prompt, max_tokens=12):
    model, params = tiny
    return naive_greedy(model, params, prompt, max_tokens, {0})


def test_continuous_batching_equals_naive_greedy(tiny):
    engine = make_engine(tiny)
    ps = prompts(10)  # more requests than slots; prompts longer than the prefill budget
    got = engine.generate(ps, [SamplingParams(max_tokens=4 + i % 9, temperature=0.0) for i in range(10)])
    for i, (p, c) in enumerate(zip(ps, got)):
        assert list(c.token_ids) == expected(tiny, p, 4 + i % 9), i
    assert engine.runner.compilations_after_warmup == 0


def test_engines_of_one_model_and_config_share_their_compiled_steps(tiny1):
    """A second engine of the same model object and settings (an engine restarted in its
    process) calls the first one's step functions: its warm-up and its requests compile
    nothing, and its tokens are the same. Another config gets functions of its own."""
    first = make_engine(tiny1)
    ps = prompts(3, seed=4)
    want = [c.token_ids for c in first.generate(ps, GREEDY)]
    compiled = first.runner._compiled()
    pool_makers = base._zeros.cache_info().misses  # the page pools' jitted maker too
    second = make_engine(tiny1)
    assert base._zeros.cache_info().misses == pool_makers
    assert all(a is b for a, b in zip(second.runner._jitted, first.runner._jitted))
    assert [c.token_ids for c in second.generate(ps, GREEDY)] == want
    assert second.runner._compiled() == compiled
    assert second.runner.compilations_after_warmup == first.runner.compilations_after_warmup == 0
    other = engine_for(*tiny1, ByteTokenizer(), num_slots=2)  # no warm-up: what it runs
    assert not set(map(id, other.runner._jitted)) & set(map(id, first.runner._jitted))
    assert [c.token_ids for c in other.generate(ps, GREEDY)] == want


def test_staggered_arrivals_in_background_loop(tiny1):
    engine = make_engine(tiny1)
    engine.start()
    try:
        ps = prompts(6, seed=1)
        streams = []
        for p in ps:
            streams.append(engine.add_request(p, GREEDY))
            time.sleep(0.05)
        results = [s.result() for s in streams]
    finally:
        engine.stop()
    for p, r in zip(ps, results):
        assert list(r.token_ids) == expected(tiny1, p)
        assert r.usage.prompt_tokens == len(p) and r.usage.completion_tokens == len(r.token_ids)
        assert r.usage.time_to_first_token is not None


def test_small_pool_preempts_and_still_matches(tiny):
    model, params = tiny
    engine = make_engine(tiny, num_pages=10, max_model_len=128)
    ps = prompts(6, seed=2)
    got = engine.generate(ps, SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True))
    for p, c in zip(ps, got):
        assert list(c.token_ids) == naive_greedy(model, params, p, 60)
    assert engine.scheduler.num_preemptions > 0
    assert engine.scheduler.num_running == 0 and engine.scheduler.num_pages_used == 0


def test_seeded_sampling_ignores_batch_mates(tiny1):
    """Also across sampling levels: `plain` runs at DRAW alone and at FILTER beside `params`."""
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=1234)
    plain = SamplingParams(max_tokens=10, temperature=1.3, seed=77)
    engine = make_engine(tiny1)
    alone = engine.generate([[5, 6, 7]], params)[0].token_ids
    plain_alone = engine.generate([[4, 4]], plain)[0].token_ids
    crowd = engine.generate(
        [[9] * 20, [5, 6, 7], [1, 2], [4, 4]],
        [SamplingParams(max_tokens=10, temperature=1.0, seed=1), params, GREEDY, plain])
    assert crowd[1].token_ids == alone
    assert crowd[3].token_ids == plain_alone


def test_prefix_cache_prefills_only_the_suffix(tiny):
    shared = prompts(1, seed=3)[0] * 2  # > 2 full pages
    a, b = shared + [1, 2, 3], shared + [4, 5]
    engine = make_engine(tiny)
    first = engine.generate([a], GREEDY)[0]
    second = engine.generate([b], GREEDY)[0]
    assert first.usage.cached_prompt_tokens == 0
    assert second.usage.cached_prompt_tokens == (len(shared) // 16) * 16
    no_cache = engine_for(*tiny, ByteTokenizer(), prefix_cache=False).generate([b], GREEDY)[0]
    assert second.token_ids == no_cache.token_ids == tuple(expected(tiny, b))


def test_freed_pages_poisoned_with_nan_change_nothing(tiny):
    engine = make_engine(tiny, num_pages=20)
    ps = prompts(6, seed=4)
    streams = [engine.add_request(p, SamplingParams(max_tokens=20, temperature=0.0)) for p in ps]
    while engine.has_work():
        free = list(engine.scheduler.allocator.free_pages())  # not cached ones: those may be shared
        if free:
            idx = jnp.asarray(free)
            engine.runner.kv_pages = [p.at[idx].set(jnp.nan) for p in engine.runner.kv_pages]
        engine.step()
    for p, s in zip(ps, streams):
        assert list(s.result().token_ids) == expected(tiny, p, 20)


def test_abort_and_deadline_free_slot_and_pages(tiny1):
    engine = make_engine(tiny1)
    long = SamplingParams(max_tokens=60, temperature=0.0)
    a = engine.add_request([1, 2, 3], long)
    b = engine.add_request([4, 5, 6], long, deadline=time.monotonic() + 0.3)
    engine.step()
    engine.step()
    engine.abort(a.request_id)
    time.sleep(0.35)
    engine.step()
    ra, rb = a.result(), b.result()
    assert ra.finish_reason == "abort" and rb.finish_reason == "abort"
    assert "deadline" in rb.detail
    assert engine.scheduler.num_running == 0 and engine.scheduler.num_pages_used == 0


def test_stop_strings_and_logprobs():
    model = Model(TINY_LLAMA)
    params = model.init_random(seed=11)
    tiny = (model, params)
    want = expected(tiny, [7, 8, 9], 12)
    text = ByteTokenizer().decode(want)
    assert len(text) >= 4
    stop = text[2:4]
    engine = make_engine(tiny)
    r = engine.generate([[7, 8, 9]], SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,),
                                                   logprobs=3))[0]
    assert r.finish_reason == "stop" and stop in r.detail
    assert r.text == text[:text.find(stop)]
    assert len(r.logprobs) == len(r.token_ids) and all(len(lp.top) == 3 for lp in r.logprobs)
    assert r.logprobs[0].token_id == r.token_ids[0] == r.logprobs[0].top[0][0]


def test_one_failing_request_does_not_take_down_the_others(tiny1, monkeypatch):
    engine = make_engine(tiny1)
    ps = prompts(3, seed=5)
    streams = [engine.add_request(p, GREEDY) for p in ps]
    victim = engine._text[streams[1].request_id]._detok

    def boom(ids):
        raise RuntimeError("detokenizer exploded")

    monkeypatch.setattr(victim, "push", boom)
    while engine.has_work():
        engine.step()
    results = [s.result() for s in streams]
    assert results[1].finish_reason == "error" and "exploded" in results[1].detail
    for i in (0, 2):
        assert list(results[i].token_ids) == expected(tiny1, ps[i])
    assert engine.generate([ps[0]], GREEDY)[0].token_ids == results[0].token_ids


def test_queue_bound_and_validation(tiny1):
    model, params = tiny1
    engine = Engine(model, params, ByteTokenizer(), EngineConfig(
        num_slots=2, max_model_len=64, num_pages=16, max_prefill_tokens=32, decode_steps=2,
        max_waiting=2, warmup=False))
    engine.add_request([1], GREEDY)
    engine.add_request([2], GREEDY)
    with pytest.raises(QueueFullError):
        engine.add_request([3], GREEDY)
    with pytest.raises(ValueError, match="prompt token id 999"):
        engine.add_request([999], GREEDY)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request([1] * 60, SamplingParams(max_tokens=10))


MIXED_WORKLOAD = """
import sys
import numpy as np
from jaxgen import checkpoints
from jaxgen.sampling_params import SamplingParams
from tests.helpers import engine_for
m = checkpoints.load(sys.argv[1])  # a real load (host-placed params) of SmolLM2's first layers
engine = engine_for(m.model, m.params, m.tokenizer, warmup=True, num_pages=128)
mixed = [
    SamplingParams(max_tokens=9, temperature=0.0),
    SamplingParams(max_tokens=5, temperature=0.8, top_p=0.9, seed=3),
    SamplingParams(max_tokens=7, temperature=1.0, top_k=5, min_p=0.05, logprobs=2),
    SamplingParams(max_tokens=6, temperature=0.0, repetition_penalty=1.3,
                   presence_penalty=0.5, frequency_penalty=0.2, stop=("zz",)),
    SamplingParams(max_tokens=8, temperature=0.7, seed=5),
]
rng = np.random.default_rng(6)
prompts = [rng.integers(1, 49152, int(n)).tolist() for n in (1, 5, 17, 33, 59, 2, 40, 9)]
engine.generate(prompts[:3], mixed[0])  # every sampling level: greedy alone, then mixed
engine.generate(prompts[3:5], mixed[4])
engine.generate(prompts, [mixed[i % 5] for i in range(8)])
print("COMPILES_AFTER_WARMUP", engine.runner.compilations_after_warmup)
"""


def test_no_compilation_after_warmup_across_a_mixed_workload(cache_dir):
    """In a fresh single-device process (as a server runs), so jit's placement-keyed cache
    sees exactly what serving does. The checkpoint is the front-end tests' cut of SmolLM2 (its
    first layers, real weights and vocabulary): which programs compile does not depend on the
    depth, and each compiles in a fraction of the whole model's time."""
    import os
    import subprocess
    import sys

    from tests.server_process import ensure_model

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", MIXED_WORKLOAD, ensure_model(cache_dir)],
                         capture_output=True, text=True,
                         env=dict(env, JAX_PLATFORMS="cpu", PYTHONPATH=root), cwd=root)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "COMPILES_AFTER_WARMUP 0" in run.stdout, run.stderr[-2000:]


@pytest.mark.parametrize("overlap", [False, True], ids=["inline", "launcher"])
def test_device_failure_fails_the_plan_not_the_engine(tiny1, monkeypatch, overlap):
    """Inline, the failed dispatch ends its requests at once; from the launcher thread
    (`overlap_launch`), when the step is read."""
    engine = make_engine(tiny1, overlap_launch=overlap)
    ps = prompts(3, seed=7)
    streams = [engine.add_request(p, GREEDY) for p in ps]
    real = engine.runner.launch

    def broken(plan):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "launch", broken)
    engine.step()  # requests in that plan fail; requests still waiting are untouched
    monkeypatch.setattr(engine.runner, "launch", real)
    while engine.has_work():
        engine.step()
    results = [s.result() for s in streams]
    failed = [r for r in results if r.finish_reason == "error"]
    assert failed and all("device lost" in r.detail for r in failed)
    for p, r in zip(ps, results):
        if r.finish_reason != "error":
            assert list(r.token_ids) == expected(tiny1, p)
    p = prompts(1, seed=8)[0]
    assert list(engine.generate([p], GREEDY)[0].token_ids) == expected(tiny1, p)
    assert engine.dead is None


@pytest.mark.parametrize("overlap", [False, True], ids=["inline", "launcher"])
def test_lost_device_buffers_mark_the_engine_dead(tiny1, monkeypatch, overlap):
    engine = make_engine(tiny1, overlap_launch=overlap)
    waiting = [engine.add_request(p, GREEDY) for p in prompts(6, seed=9)]  # > slots: some wait

    def consume_and_fail(plan):
        for pages in engine.runner.kv_pages:
            pages.delete()  # what a donated call that then fails leaves behind
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine.runner, "launch", consume_and_fail)
    engine.step()
    assert all(s.result().finish_reason == "error" for s in waiting)
    assert engine.dead is not None
    with pytest.raises(RuntimeError, match="engine is not serving"):
        engine.add_request([1, 2], GREEDY)


def test_a_device_that_fails_its_probe_marks_the_engine_dead(tiny1, monkeypatch):
    """A sticky device error (CUDA_ERROR_LAUNCH_FAILED poisons the context: every later call
    fails) surfaces while reading a step; the buffers look intact, the probe tells."""
    engine = make_engine(tiny1)
    streams = [engine.add_request(p, GREEDY) for p in prompts(6, seed=11)]
    engine.step()  # admitted and running

    def poisoned(launched):
        raise RuntimeError("INTERNAL: CUDA error: unspecified launch failure")

    def probe_fails():
        raise RuntimeError("INTERNAL: CUDA error: unspecified launch failure")

    monkeypatch.setattr(engine.runner, "collect", poisoned)
    monkeypatch.setattr(engine.runner, "_probe_device", probe_fails)
    for _ in range(10):
        if engine.dead is not None:
            break
        engine.step()
    assert engine.dead is not None and "launch failure" in str(engine.dead)
    assert all(s.result().finish_reason == "error" for s in streams)  # waiting ones too
    with pytest.raises(RuntimeError, match="engine is not serving"):
        engine.add_request([1, 2], GREEDY)


def test_the_device_probe_passes_on_a_healthy_device(tiny1):
    engine = make_engine(tiny1)
    assert engine.runner.device_lost() is False
    engine.runner._probe_device()  # runs on every device of the state


def test_quiesced_pauses_the_loop_with_nothing_in_flight(tiny1):
    engine = make_engine(tiny1)
    ps = prompts(6, seed=12)
    engine.start()
    try:
        streams = [engine.add_request(p, GREEDY) for p in ps]
        time.sleep(0.3)  # running, steps launched ahead
        with engine.quiesced(timeout_s=60):
            assert not engine._pipeline.in_flight  # every launched step read: the device is idle
            step = engine.scheduler._step
            late = engine.add_request(prompts(1, seed=13)[0], GREEDY)  # queued meanwhile
            time.sleep(0.3)
            assert engine.scheduler._step == step  # nothing planned while paused
        results = [s.result() for s in streams + [late]]
    finally:
        engine.stop()
    for p, r in zip(ps + prompts(1, seed=13), results):
        assert list(r.token_ids) == expected(tiny1, p)


def test_quiesced_times_out_mid_step_and_serving_resumes(tiny1, monkeypatch):
    engine = make_engine(tiny1)
    real_step = engine.step

    def slow_step():
        time.sleep(0.5)  # a step the pause cannot interrupt
        return real_step()

    monkeypatch.setattr(engine, "step", slow_step)
    engine.start()
    try:
        stream = engine.add_request(prompts(1, seed=15)[0], GREEDY)
        time.sleep(0.1)  # inside the first slow step
        with pytest.raises(TimeoutError, match="did not pause within 0.1s"):
            with engine.quiesced(timeout_s=0.1):
                pass
        result = stream.result()  # the failed pause left no pause behind
    finally:
        engine.stop()
    assert list(result.token_ids) == expected(tiny1, prompts(1, seed=15)[0])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_quiesced_does_not_wait_on_a_loop_that_died(tiny1, monkeypatch):
    engine = make_engine(tiny1)

    def crash():
        raise RuntimeError("loop bug")

    real_step = engine.step

    def slow_step():
        time.sleep(0.05)
        return real_step()

    monkeypatch.setattr(engine, "_drain", crash)  # the loop dies on its way to the pause
    monkeypatch.setattr(engine, "step", slow_step)  # still decoding when the pause comes
    engine.start()
    try:
        long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
        engine.add_request([5, 6, 7], long)
        time.sleep(0.2)
        start = time.monotonic()
        with engine.quiesced(timeout_s=30):
            waited = time.monotonic() - start
    finally:
        engine.stop()
    assert waited < 5 and isinstance(engine.dead, RuntimeError)


def test_quiesced_without_a_loop_thread_reads_the_launched_steps(tiny1):
    engine = make_engine(tiny1)
    stream = engine.add_request(prompts(1, seed=14)[0], GREEDY)
    engine.step()
    engine.step()
    with engine.quiesced():
        assert not engine._pipeline.in_flight
    while engine.has_work():
        engine.step()
    assert list(stream.result().token_ids) == expected(tiny1, prompts(1, seed=14)[0])


def test_decode_steps_are_launched_ahead_and_change_nothing(tiny1):
    """Steps are launched before the previous one's tokens are read (decoding, chunked
    prompts, admissions); requests that stop inside a step lose only look-ahead tokens
    (outputs equal the naive decode)."""
    engine = make_engine(tiny1)
    ahead = []
    real = engine.scheduler.schedule_ahead

    def counting():
        plan = real()
        if plan is not None:
            ahead.append(plan)
        return plan

    engine.scheduler.schedule_ahead = counting
    ps = prompts(7, seed=21)  # more than the 4 slots; prompts up to 60 tokens, 32 per step
    out = engine.generate(ps, GREEDY)
    assert len(ahead) >= 2
    assert any(p.assignments for p in ahead) and any(p.decode_slots for p in ahead)
    assert any(not c.sample for p in ahead for c in p.prefills), "no chunked prompt went on ahead"
    for p, c in zip(ps, out):
        assert list(c.token_ids) == expected(tiny1, p)
    assert engine.scheduler.allocator.num_used == 0


def test_next_step_is_launched_before_tokens_are_delivered(tiny1):
    """Where the next step is not planned ahead (here: never), it is planned and launched as
    soon as the previous step is updated, before that step's tokens become text: text work
    overlaps the device."""
    engine = make_engine(tiny1, num_slots=2)
    engine.scheduler.schedule_ahead = lambda: None
    in_flight = []
    real = engine._deliver

    def deliver(events):
        if events:
            in_flight.append(engine._pipeline.in_flight)
        real(events)

    engine._deliver = deliver
    ps = [list(range(1, 80)), *prompts(3, seed=42)]  # 4 requests, 2 slots, chunked prefill
    out = engine.generate(ps, GREEDY)
    for p, c in zip(ps, out):
        assert list(c.token_ids) == expected(tiny1, p)
    # Every delivery but the last (nothing left to run) had the next step in flight.
    assert all(n >= 1 for n in in_flight[:-1]) and len(in_flight) > 4, in_flight


def test_a_step_launched_after_the_device_drained_is_reported(tiny1):
    """When delivering tokens takes the host longer than the step in flight takes the device,
    the next launch finds the device idle: observers are told (the host gap cannot show it,
    since that step is still launched before the previous one's tokens are read)."""
    class Launches(EngineObserver):
        def __init__(self):
            self.drained = []

        def on_launch(self, device_drained, launch_seconds):
            self.drained.append(device_drained)

    engine = make_engine(tiny1)
    seen = Launches()
    engine.observers.append(seen)
    real = engine._deliver

    def slow_deliver(events):
        real(events)
        if events:
            time.sleep(0.3)  # far longer than a tiny model's step on device

    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    engine.generate(prompts(2, seed=7), params)  # compiles every step shape
    engine._deliver = slow_deliver
    seen.drained.clear()
    engine.generate(prompts(2, seed=7), params)
    # The first launch ahead follows the prefill at once; every later one waited 0.3 s.
    assert len(seen.drained) >= 3 and all(seen.drained[1:]), seen.drained


def test_drained_is_asked_after_the_dispatch_which_is_timed(tiny1, monkeypatch):
    """A slow dispatch drains the device as surely as slow delivery: the previous step is asked
    whether it finished once the new one is queued, and the dispatch time is reported."""
    from jaxgen.runtime import runner as runner_module

    order, reports = [], []

    class Launches(EngineObserver):
        def on_launch(self, device_drained, launch_seconds):
            reports.append((device_drained, launch_seconds))

    engine = make_engine(tiny1)
    engine.observers.append(Launches())
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    engine.generate(prompts(2, seed=7), params)  # compiles every step shape
    real_launch, real_done = engine.runner.launch, runner_module.LaunchedStep.done

    def slow_launch(plan):
        out = real_launch(plan)
        time.sleep(0.2)
        order.append("launched")
        return out

    def done(self):
        order.append("asked")
        return real_done(self)

    monkeypatch.setattr(engine.runner, "launch", slow_launch)
    monkeypatch.setattr(runner_module.LaunchedStep, "done", done)
    reports.clear()
    engine.generate(prompts(2, seed=7), params)
    assert len(reports) >= 2 and all(d for d, _ in reports), reports
    assert all(t >= 0.2 for _, t in reports), reports
    assert order[:3] == ["launched", "launched", "asked"], order  # asked after the dispatch


def test_observers_hear_of_a_finished_request_before_its_caller(tiny1):
    """A caller holding the final output can rely on the request being counted and logged
    (a draining server exits once its last stream ends)."""
    class Slow(EngineObserver):
        finished = []

        def on_finish(self, finished):
            time.sleep(0.2)
            self.finished.append(finished.output.request_id)

    engine = make_engine(tiny1)
    engine.observers.append(Slow())
    engine.start()
    try:
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        stream = engine.add_request([3, 4, 5], params, request_id="r")
        assert stream.result().finish_reason == "length"
        assert Slow.finished == ["r"]
    finally:
        engine.stop()


def test_failure_while_reading_a_step_launched_ahead_fails_only_running_requests(tiny1, monkeypatch):
    """A device error surfacing when tokens are read (with the next step already launched)
    ends the running requests with "error"; the engine keeps serving."""
    engine = make_engine(tiny1)
    streams = [engine.add_request(p, SamplingParams(max_tokens=30, temperature=0.0))
               for p in prompts(2, seed=31)]
    real = engine.runner.collect
    engine.step()  # prefills
    engine.step()  # the first decode step, with the next one launched ahead
    assert engine._pipeline.in_flight, "nothing was launched ahead"

    def broken(launched):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "collect", broken)
    engine.step()
    monkeypatch.setattr(engine.runner, "collect", real)
    results = [s.result() for s in streams]
    assert all(r.finish_reason == "error" and "device lost" in r.detail for r in results)
    assert engine.scheduler.num_pages_used == 0 and engine.dead is None
    p = prompts(1, seed=32)[0]
    assert list(engine.generate([p], GREEDY)[0].token_ids) == expected(tiny1, p)


def test_stop_token_ids_outside_the_vocabulary_are_refused(tiny1):
    engine = make_engine(tiny1)
    with pytest.raises(ValueError, match=r"stop_token_ids\[1\]=256: outside the vocabulary \[0, 256\)"):
        engine.add_request([1, 2], SamplingParams(stop_token_ids=(3, 256)))
    assert not engine.has_work()


def _aligned_zeros(shape, dtype=np.int32, alignment=64):
    """Zeros whose buffer starts on an `alignment`-byte boundary (CPU device_put aliases those)."""
    n, size = int(np.prod(shape)), np.dtype(dtype).itemsize
    raw = np.zeros(n * size + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + n * size].view(dtype).reshape(shape)


def test_a_step_in_flight_keeps_its_page_table_when_the_next_is_planned(tiny1):
    """The page table a launched step reads is never changed by the host planning the next step
    (CPU device_put of an aligned host array shares its memory: updating the host table in
    place would move an in-flight step's K/V writes into another request's pages). Checked on the
    tables themselves: an end-to-end run with these tiny models passes even with the aliasing
    (their steps finish before the host edits the table), so it would prove nothing."""
    engine = make_engine(tiny1)
    runner = engine.runner
    runner._page_table = _aligned_zeros(runner._page_table.shape)
    runner._update_page_table({0: [3, 4]})
    handed = runner.state.page_table
    runner._update_page_table({0: [5], 1: [6]})
    assert np.asarray(handed)[:2, :2].tolist() == [[3, 4], [0, 0]]
    assert np.asarray(runner.state.page_table)[:2, :2].tolist() == [[5, 0], [6, 0]]
