"""Both implementations of the engine surface — the in-process `Engine` and the `EngineClient` of
an engine process — built from one `Config`, pass one shared test body: requests stream and
finish, errors are the surface's, aborts end requests, info and stats agree, observers are told,
and a stop is clean."""

from __future__ import annotations

import dataclasses
import time

import pytest

from jaxgen.config import Config, EngineConfig, ModelSource, ServerConfig
from jaxgen.engine_api import (EngineObserver, EngineSurface, QueueFullError, RequestError,
                               RequestTooLongError)
from jaxgen.sampling_params import SamplingParams
from tests.server_process import MODEL, ensure_model


class Finished(EngineObserver):
    def __init__(self):
        self.ids = []

    def on_finish(self, finished):
        self.ids.append(finished.output.request_id)


def wait_for(engine, condition, timeout_s: float = 30.0):
    """The engine's stats once `condition(stats)` holds (an engine process reports its counters
    a few times a second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = engine.stats()
        if condition(stats):
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.02)


def build(mode: str, config: Config):
    if mode == "thread":
        from jaxgen.build import build_engine

        engine = build_engine(config)
        engine.start()
        return engine
    from jaxgen.server.engine_client import EngineClient

    return EngineClient(config)


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_both_engine_modes_satisfy_the_surface(mode, cache_dir, xla_cache_dir):
    ensure_model(cache_dir)
    config = Config(ModelSource(MODEL, cache_dir=cache_dir, served_model_name="small"),
                    EngineConfig(num_slots=2, max_model_len=128, num_pages=32, decode_steps=2,
                                 max_prefill_tokens=32, max_waiting=2, warmup=False),
                    ServerConfig(log_level="WARNING"), compilation_cache_dir=xla_cache_dir)
    engine = build(mode, config)
    try:
        assert isinstance(engine, EngineSurface)
        info = engine.info()
        assert (info.name, info.num_slots, info.max_model_len, info.max_waiting) == ("small", 2, 128, 2)
        assert info.vocab_size == 49152 and info.architecture == "llama"
        finished = Finished()
        engine.observers.append(finished)
        ids = engine.tokenizer.encode("The capital of France is")
        greedy = SamplingParams(max_tokens=6, temperature=0.0)
        done = engine.add_request(ids, greedy, request_id="r1").result()
        assert done.finish_reason == "length" and len(done.token_ids) == 6 and "Paris" in done.text
        assert done.usage.prompt_tokens == len(ids)
        for bad, error in [(([], greedy), RequestError), (([49152], greedy), RequestError),
                           ((ids, dataclasses.replace(greedy, max_tokens=200)), RequestTooLongError)]:
            with pytest.raises(error):
                engine.add_request(*bad)
        long = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
        streams = [engine.add_request(ids, long, request_id=f"long{i}") for i in range(2)]
        wait_for(engine, lambda s: s.num_running == 2)  # both slots busy
        streams += [engine.add_request(ids, long, request_id=f"long{i}") for i in (2, 3)]
        with pytest.raises(QueueFullError):  # two running + two waiting: the bound
            engine.add_request(ids, long, request_id="one-too-many")
        for s in streams:
            engine.abort(s.request_id)
        assert all(s.result().finish_reason == "abort" for s in streams)
        assert {"r1", "long0", "long3"} <= set(finished.ids)
        stats = wait_for(engine, lambda s: s.num_running == s.num_waiting == s.num_pages_used == 0)
        assert stats.num_free_slots == 2 and engine.dead is None
    finally:
        engine.stop()
