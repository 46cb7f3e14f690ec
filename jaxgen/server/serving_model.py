"""`ServingModel`: the engine a server answers with (through the engine surface only), plus what
it reports about it (`GetModelInfo`, `GetServerStats`). Reads `info()` and `stats()`; changes
nothing.
"""

from __future__ import annotations

import dataclasses

from jaxgen.engine_api import EngineInfo, EngineSurface
from jaxgen.sampling_params import MAX_LOGPROBS, MAX_STOP_STRING_LEN, MAX_STOP_STRINGS
from jaxgen.v1 import generation_pb2 as pb


@dataclasses.dataclass(frozen=True)
class ServingModel:
    engine: EngineSurface  # a started jaxgen.engine.Engine, or the EngineClient of one
    info: EngineInfo = dataclasses.field(init=False)  # fixed once the engine is ready

    def __post_init__(self):
        object.__setattr__(self, "info", self.engine.info())

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_context(self) -> int:
        """prompt + max_tokens limit of one request."""
        return self.info.max_model_len


def model_info(m: ServingModel) -> pb.ModelInfo:
    i = m.info
    return pb.ModelInfo(
        name=i.name, architecture=i.architecture, vocab_size=i.vocab_size,
        max_context_length=i.max_model_len, max_position_embeddings=i.max_position_embeddings,
        page_size=i.page_size, num_slots=i.num_slots, num_pages=i.num_pages,
        mesh=[pb.MeshAxis(name=n, size=s) for n, s in i.mesh], dtype=i.dtype, device=i.device,
        max_waiting=i.max_waiting, decode_steps=i.decode_steps,
        stop_token_ids=sorted(m.tokenizer.stop_ids),
        has_chat_template=bool(m.tokenizer.chat_template),
        max_stop_strings=MAX_STOP_STRINGS, max_stop_string_length=MAX_STOP_STRING_LEN,
        max_logprobs=MAX_LOGPROBS)


def server_stats(m: ServingModel, active_streams: int) -> pb.ServerStats:
    s = m.engine.stats()
    return pb.ServerStats(
        num_running=s.num_running, num_waiting=s.num_waiting, num_free_slots=s.num_free_slots,
        num_pages_used=s.num_pages_used, num_pages_free=s.num_pages_free,
        num_preemptions=s.num_preemptions, prefix_cache_query_tokens=s.prefix_cache_query_tokens,
        prefix_cache_hit_tokens=s.prefix_cache_hit_tokens, active_streams=active_streams,
        compilations_after_warmup=s.compilations_after_warmup, num_displaced=s.num_displaced,
        num_queue_timeouts=s.num_queue_timeouts, engine_restarts=s.num_engine_restarts)
