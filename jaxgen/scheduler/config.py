"""`SchedulerConfig`: the scheduler's limits, frozen and validated on construction.

Knows sizes (slots, pages, lengths, budgets) and the model's stop ids; does not know the model,
the device or how the pool size was measured (the runtime sizes the pool, the engine passes the
numbers here).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from jaxgen.scheduler.ngram import NgramConfig

if TYPE_CHECKING:
    from jaxgen.config import EngineConfig

# The acceptance rate a drafting request must keep: from the measured verify cost, within these
# bounds; without a measurement (no warm-up), the default.
MIN_ACCEPTANCE, MAX_ACCEPTANCE, DEFAULT_MIN_ACCEPTANCE = 0.1, 0.9, 0.25


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    # No defaults: the engine derives these from its EngineConfig (`scheduler_config` below),
    # the one place their defaults live.
    num_slots: int  # decode batch rows
    num_pages: int  # KV pages in the pool, the null page 0 included
    max_model_len: int  # prompt + max_tokens limit of one request
    page_size: int  # tokens per page, a multiple of 16
    max_waiting: int  # bound of the waiting queue; add() beyond it raises QueueFullError
    max_prefill_tokens: int  # prompt tokens prefilled per step, over all chunks
    decode_steps: int  # k: tokens each decode slot advances per step (StepPlan.num_steps)
    enable_prefix_cache: bool
    model_stop_ids: frozenset[int] = frozenset()  # ignored for requests with ignore_eos
    speculative: NgramConfig | None = None  # n-gram drafts verified in the batch (None: off)
    # Seconds a request may wait, never scheduled, before it is shed (None: no limit).
    max_queue_time: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "model_stop_ids", frozenset(self.model_stop_ids))

        def bad(field, value, rule):
            raise ValueError(f"{field}={value!r}: {rule}")

        for field in ("num_slots", "max_model_len", "max_waiting", "max_prefill_tokens",
                      "decode_steps"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                bad(field, value, "must be an integer >= 1")
        if not isinstance(self.page_size, int) or self.page_size < 16 or self.page_size % 16:
            bad("page_size", self.page_size, "must be a positive multiple of 16")
        if self.max_model_len < 2:
            bad("max_model_len", self.max_model_len, "must be >= 2 (one prompt + one new token)")
        # One request of max_model_len must fit in the pool alone; then the oldest running
        # request can always grow once everyone newer is preempted, so preemption cannot deadlock.
        need = 1 + self.max_pages_per_request
        if not isinstance(self.num_pages, int) or self.num_pages < need:
            bad("num_pages", self.num_pages,
                f"must be >= {need} (the null page + {need - 1} pages for one request of "
                f"max_model_len={self.max_model_len})")
        if self.max_queue_time is not None and not self.max_queue_time > 0:
            bad("max_queue_time", self.max_queue_time, "must be > 0 (or None: no limit)")
        if any(not isinstance(t, int) or t < 0 for t in self.model_stop_ids):
            bad("model_stop_ids", sorted(self.model_stop_ids), "must be non-negative token ids")

    @property
    def max_pages_per_request(self) -> int:
        """Pages covering max_model_len tokens: the most one request ever holds. (The runtime's
        page-table rows may be longer: lookahead writes past them land in the null page.)"""
        return -(-self.max_model_len // self.page_size)


def scheduler_config(config: EngineConfig, num_pages: int, model_stop_ids,
                     verify_cost: float | None = None) -> SchedulerConfig:
    """The scheduler's settings: the engine's (resolved) config, the pool the runner sized and,
    with speculative decoding, a verify step's measured cost in decode tokens: a request keeps
    drafting while its acceptance rate pays for it (1 + rate x K tokens per verify >= cost)."""
    draft = None
    if config.speculative == "ngram":
        k = config.num_speculative_tokens
        threshold = DEFAULT_MIN_ACCEPTANCE if verify_cost is None else \
            min(max((verify_cost - 1) / k, MIN_ACCEPTANCE), MAX_ACCEPTANCE)
        draft = NgramConfig(k, config.ngram_max, config.ngram_min, min_acceptance=threshold,
                            max_batch=config.speculative_max_batch)
    return SchedulerConfig(
        num_slots=config.num_slots, num_pages=num_pages, page_size=config.page_size,
        max_model_len=config.max_model_len, max_waiting=config.max_waiting,
        max_prefill_tokens=config.max_prefill_tokens, decode_steps=config.decode_steps,
        model_stop_ids=frozenset(model_stop_ids), enable_prefix_cache=config.enable_prefix_cache,
        max_queue_time=config.max_queue_time_s, speculative=draft)
