"""`ServingModel`: the engine a server answers with, plus what it reports about it
(`GetModelInfo`, `GetServerStats`).

Reads only the engine's public attributes (its scheduler's config and counters, the runner's
pool size, the tokenizer); changes nothing. The scheduler's counters are plain lengths, safe to
read from the event loop while the engine thread steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from jaxgen.sampling_params import MAX_LOGPROBS, MAX_STOP_STRING_LEN, MAX_STOP_STRINGS
from jaxgen.v1 import generation_pb2 as pb


@dataclasses.dataclass(frozen=True)
class ServingModel:
    # A started jaxgen.engine.Engine, or the EngineClient of one in its own process
    # (jaxgen.server.engine_process): the same calls and attributes.
    engine: object
    name: str
    mesh: tuple[tuple[str, int], ...]  # (axis name, size), e.g. (("data", 1), ("model", 8))
    device: str  # e.g. "cpu x1"
    # profile(duration_s) -> the directory of a profiler trace of the process that runs the
    # engine (CaptureProfile); None: profiling not enabled.
    profile: Callable[[float], str] | None = None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_config(self):
        return self.engine.runner.model.config

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold: the model's embedding rows."""
        return self.model_config.vocab_size

    @property
    def max_context(self) -> int:
        """prompt + max_tokens limit of one request."""
        return self.engine.scheduler.config.max_model_len


def model_info(m: ServingModel) -> pb.ModelInfo:
    sched = m.engine.scheduler.config
    return pb.ModelInfo(
        name=m.name, architecture=m.model_config.architecture, vocab_size=m.vocab_size,
        max_context_length=m.max_context,
        max_position_embeddings=m.model_config.max_position_embeddings,
        page_size=sched.page_size, num_slots=sched.num_slots, num_pages=m.engine.runner.num_pages,
        mesh=[pb.MeshAxis(name=n, size=s) for n, s in m.mesh], dtype=m.model_config.dtype,
        device=m.device, max_waiting=sched.max_waiting, decode_steps=sched.decode_steps,
        stop_token_ids=sorted(m.tokenizer.stop_ids),
        has_chat_template=bool(m.tokenizer.chat_template),
        max_stop_strings=MAX_STOP_STRINGS, max_stop_string_length=MAX_STOP_STRING_LEN,
        max_logprobs=MAX_LOGPROBS)


def server_stats(m: ServingModel, active_streams: int) -> pb.ServerStats:
    s = m.engine.scheduler
    return pb.ServerStats(
        num_running=s.num_running, num_waiting=s.num_waiting, num_free_slots=s.num_free_slots,
        num_pages_used=s.num_pages_used, num_pages_free=s.num_pages_free,
        num_preemptions=s.num_preemptions, prefix_cache_query_tokens=s.prefix_cache_query_tokens,
        prefix_cache_hit_tokens=s.prefix_cache_hit_tokens, active_streams=active_streams,
        compilations_after_warmup=m.engine.runner.compilations_after_warmup)
