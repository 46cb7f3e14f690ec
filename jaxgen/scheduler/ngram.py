"""N-gram (prompt lookup) drafts for speculative decoding: a request's own tokens propose what
comes next. The longest recent n-gram ending the sequence (`ngram_max` down to `ngram_min`
tokens) that occurred earlier proposes the tokens that followed that occurrence, up to K.

Host-side and O(new tokens) per step: an index per request maps each n-gram to the position
after its latest occurrence, extended as tokens arrive (never a rescan). The index lags one
position behind the sequence, so the n-grams ending the sequence find their earlier occurrence,
not themselves.

Adaptive: when the recent acceptance rate (an exponential average over verified drafts) falls
below `min_acceptance`, the request stops proposing for `cooldown` of its tokens, so free-writing
text pays nothing for drafts that keep failing. After a cooldown the average restarts at the
threshold, so one more failing verify ends the trial, and each trial that fails at once doubles
the next cooldown (up to `max_cooldown`); a verify at or above the threshold resets it.
Knows tokens only: nothing of the device.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class NgramConfig:
    num_speculative_tokens: int = 4  # K: drafted tokens verified per step
    ngram_max: int = 4
    ngram_min: int = 2
    min_acceptance: float = 0.25  # below it (recent average), stop proposing for a while
    cooldown: int = 32  # tokens without proposals after the acceptance fell
    max_cooldown: int = 512  # the longest cooldown, after trials that failed at once
    ema: float = 0.3  # weight of the newest verify step in the average
    # Nobody drafts while more requests than this run: a verify step computes K+1 rows per
    # request, and past some batch the step costs more than the drafts save (on a CPU, whose
    # matmuls are compute-bound beyond one row, already at 8; docs/speculative.md).
    max_batch: int = 4

    def __post_init__(self):
        def bad(field, value, rule):
            raise ValueError(f"{field}={value!r}: {rule}")
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 1:
            bad("num_speculative_tokens", self.num_speculative_tokens, "must be an integer >= 1")
        if not isinstance(self.ngram_min, int) or self.ngram_min < 1:
            bad("ngram_min", self.ngram_min, "must be an integer >= 1")
        if not isinstance(self.ngram_max, int) or self.ngram_max < self.ngram_min:
            bad("ngram_max", self.ngram_max, f"must be an integer >= ngram_min={self.ngram_min}")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            bad("max_batch", self.max_batch, "must be an integer >= 1")
        if not 0 <= self.min_acceptance <= 1:
            bad("min_acceptance", self.min_acceptance, "must be in [0, 1]")
        if not isinstance(self.cooldown, int) or self.cooldown < 1:
            bad("cooldown", self.cooldown, "must be an integer >= 1")
        if not isinstance(self.max_cooldown, int) or self.max_cooldown < self.cooldown:
            bad("max_cooldown", self.max_cooldown, f"must be an integer >= cooldown={self.cooldown}")


class NgramProposer:
    """The draft source of one request."""

    def __init__(self, config: NgramConfig, tokens=()):
        self.config = config
        self._tokens: list[int] = []
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> position right after it
        self._indexed = 0  # n-grams ending before this position are in the index
        self._acceptance = 1.0
        self._cooldown = 0
        self._last_cooldown = config.cooldown  # doubled by each trial that fails at once
        self._trial = False  # the first verify after a cooldown
        self.proposed = self.accepted = 0  # totals, for usage and metrics
        self.extend(tokens)

    def extend(self, tokens) -> None:
        """Appends the request's new tokens (prompt first, then each step's outputs)."""
        self._tokens.extend(tokens)
        self._cooldown = max(0, self._cooldown - len(tokens))
        c, t = self.config, self._tokens
        # Index the n-grams ending at positions up to len - 2: the one ending the sequence is
        # what `propose` looks up.
        for end in range(self._indexed, len(t) - 1):
            for n in range(c.ngram_min, c.ngram_max + 1):
                if end + 1 >= n:
                    self._index[tuple(t[end + 1 - n:end + 1])] = end + 1
        self._indexed = max(self._indexed, len(t) - 1)

    @property
    def active(self) -> bool:
        """False while cooling down after drafts that kept failing."""
        return self._cooldown == 0

    def propose(self, limit: int | None = None) -> tuple[int, ...]:
        """Up to K (and `limit`) tokens expected to follow; () when nothing matches or the
        request is cooling down."""
        c, t = self.config, self._tokens
        k = c.num_speculative_tokens if limit is None else min(limit, c.num_speculative_tokens)
        if self._cooldown or k < 1:
            return ()
        for n in range(min(c.ngram_max, len(t)), c.ngram_min - 1, -1):
            start = self._index.get(tuple(t[len(t) - n:]))
            if start is not None:
                return tuple(t[start:start + k])
        return ()

    def record(self, proposed: int, accepted: int) -> None:
        """The outcome of one verify step of this request's drafts."""
        if proposed <= 0:
            return
        self.proposed += proposed
        self.accepted += accepted
        c = self.config
        rate = accepted / proposed
        self._acceptance = (1 - c.ema) * self._acceptance + c.ema * rate
        if self._acceptance < c.min_acceptance:
            self._last_cooldown = min(2 * self._last_cooldown, c.max_cooldown) if self._trial \
                else c.cooldown
            self._cooldown = self._last_cooldown
            # After the cooldown: the average starts at the threshold, so the first verify
            # alone decides whether drafting goes on.
            self._acceptance, self._trial = c.min_acceptance, True
        elif rate >= c.min_acceptance:
            self._trial = False
