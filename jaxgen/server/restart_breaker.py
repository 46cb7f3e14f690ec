"""`RestartBreaker`: whether a failed engine may be restarted, and after how long.

A crash loop must not become a server that is forever "almost up": at most `max_restarts`
restarts within `window_s`; one more failure opens the breaker, and the server gives up (stays
NOT_SERVING, drains, exits non-zero) so that its orchestrator replaces it. Within the window,
each restart waits longer than the one before (none for the first: a one-off crash recovers at
once), so a failure that repeats does not spin.

Plain logic over a clock; knows nothing of processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from jaxgen.config import RESTART_WINDOW_S

BACKOFF_FIRST_S = 0.5  # before the second restart within the window; doubles after each
BACKOFF_MAX_S = 30.0


class RestartBreaker:
    def __init__(self, max_restarts: int, window_s: float = RESTART_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic):
        if max_restarts < 0:
            raise ValueError(f"max_restarts={max_restarts}: must be >= 0")
        self.max_restarts, self.window_s = max_restarts, window_s
        self._clock = clock
        self._recent: list[float] = []  # times of the restarts within the window
        self.total = 0  # restarts ever allowed

    def allow(self) -> bool:
        """Records a restart if one more is within the limit; False opens the breaker."""
        now = self._clock()
        self._recent = [t for t in self._recent if now - t < self.window_s]
        if len(self._recent) >= self.max_restarts:
            return False
        self._recent.append(now)
        self.total += 1
        return True

    def backoff_s(self) -> float:
        """The wait before the restart just allowed: 0 for the first within the window, then
        BACKOFF_FIRST_S doubling up to BACKOFF_MAX_S."""
        n = len(self._recent)
        return 0.0 if n <= 1 else min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (n - 2))

    def describe(self) -> str:
        return (f"{len(self._recent)} restart(s) within {self.window_s:g}s "
                f"(--max-engine-restarts={self.max_restarts})")
