"""Progress of a batch job a person can watch: a tqdm bar on stderr when it is a terminal (lines
done / total, output tok/s, ETA), else a plain log line every LOG_INTERVAL_S; nothing when quiet.
"""

from __future__ import annotations

import sys
import time

LOG_INTERVAL_S = 10.0


class Progress:
    def __init__(self, total: int, done: int, quiet: bool = False, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.done, self.quiet = total, done, quiet
        self.start = time.perf_counter()
        self._logged = self.start
        self._bar = None
        if not quiet and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, unit="line", file=self.stream,
                             dynamic_ncols=True, smoothing=0.1)

    def tick(self, summary, done: int = 0) -> None:
        if self.quiet:
            return
        self.done += done
        rate = summary.output_tokens / max(time.perf_counter() - self.start, 1e-9)
        if self._bar is not None:
            self._bar.update(done)
            self._bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
            return
        now = time.perf_counter()
        if now - self._logged >= LOG_INTERVAL_S:
            self._logged = now
            left = self.total - self.done
            per_line = (now - self.start) / max(summary.ok + summary.failed, 1)
            print(f"jaxgen batch: {self.done}/{self.total} lines, {rate:,.1f} output tok/s, "
                  f"ETA {left * per_line:,.0f}s", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
