"""`RequestText`: one request's output tokens turned into streamed text — the incremental
detokenizer, then stop strings (never streamed past). The engine feeds it each step's new ids
and ends the request when a stop string matches.

Knows the tokenizer and strings; nothing of the scheduler, sampling or streams.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from jaxgen.tokenizer.base import Tokenizer
from jaxgen.tokenizer.detokenizer import IncrementalDetokenizer
from jaxgen.tokenizer.stop_strings import StopStringMatcher


class RequestText:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Iterable[str],
                 stop_ids: frozenset[int]):
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stop = StopStringMatcher(stop)
        self._stop_ids = stop_ids  # ids that end the request: the last of them is not text

    def push(self, ids: Sequence[int], finish_reason: str | None) -> tuple[str, str | None]:
        """The text `ids` add, and the stop string that matched in it (None if none). With a
        finish reason the request ends here: everything held back is released, unless a stop
        string matched (the text past it is never shown)."""
        text_ids = ids
        if finish_reason == "stop" and ids and ids[-1] in self._stop_ids:
            text_ids = ids[:-1]  # the stop token itself is not text
        emit, matched = self._stop.feed(self._detok.push(text_ids))
        if finish_reason is not None and matched is None:
            emit += self._stop.feed(self._detok.flush())[0] + self._stop.flush()
        return emit, matched
