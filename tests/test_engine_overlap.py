"""The engine with `overlap_launch`: steps dispatched from a launcher thread, in launch order,
while the engine thread reads, updates and delivers the previous ones. Its outputs must be
those of the inline dispatch, its slow twin (the failure tests in tests/test_engine.py run
both ways)."""

import threading

from jaxgen.engine_api import EngineObserver
from jaxgen.sampling_params import SamplingParams
from tests.helpers import ByteTokenizer, engine_for
from tests.test_engine import GREEDY, expected, make_engine, prompts, tiny  # noqa: F401 (fixture)


def overlapped(tiny, **runner):
    return make_engine(tiny, overlap_launch=True, **runner)


def test_outputs_equal_naive_greedy_and_dispatch_runs_on_the_launcher(tiny):
    engine = overlapped(tiny)
    threads = set()
    real = engine.runner.launch

    def launch(plan):
        threads.add(threading.current_thread().name)
        return real(plan)

    engine.runner.launch = launch
    ps = prompts(10)  # more requests than slots, chunked prompts, steps launched ahead
    got = engine.generate(ps, [SamplingParams(max_tokens=4 + i % 9, temperature=0.0)
                               for i in range(10)])
    for i, (p, c) in enumerate(zip(ps, got)):
        assert list(c.token_ids) == expected(tiny, p, 4 + i % 9), i
    assert len(threads) == 1 and threads.pop().startswith("jaxgen-launch")
    assert engine.runner.compilations_after_warmup == 0
    assert engine.scheduler.allocator.num_used == 0


def test_seeded_sampling_equals_inline_dispatch(tiny):
    params = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=3)
    ps = prompts(6, seed=4)
    inline = engine_for(*tiny, ByteTokenizer()).generate(ps, params)
    over = overlapped(tiny).generate(ps, params)
    assert [c.token_ids for c in over] == [c.token_ids for c in inline]


def test_background_loop_quiesce_and_stop(tiny):
    """The loop thread serves, pauses with nothing in flight (every dispatch resolved and
    read), resumes, and stop() ends both threads; launches are observed as usual."""
    class Launches(EngineObserver):
        def __init__(self):
            self.count = 0

        def on_launch(self, device_drained, launch_seconds):
            assert launch_seconds >= 0
            self.count += 1

    engine = overlapped(tiny)
    seen = Launches()
    engine.observers.append(seen)
    launchers = set()
    real = engine.runner.launch

    def launch(plan):
        launchers.add(threading.current_thread())
        return real(plan)

    engine.runner.launch = launch
    engine.start()
    try:
        ps = prompts(6, seed=12)
        streams = [engine.add_request(p, GREEDY) for p in ps[:3]]
        with engine.quiesced(timeout_s=30):
            assert not engine._pipeline.in_flight
        streams += [engine.add_request(p, GREEDY) for p in ps[3:]]
        for p, s in zip(ps, streams):
            assert list(s.result().token_ids) == expected(tiny, p)
    finally:
        engine.stop()
    assert seen.count > 0
    assert launchers and not any(t.is_alive() for t in launchers)
