"""Stop strings on streamed text: where a request's output must end, found across deltas.

`StopStringMatcher.feed(delta)` takes the detokenizer's deltas one by one and returns the text that
is safe to show plus, once a stop string has appeared, which one. The answer does not depend on how
the text was cut into deltas: the emitted text is always what one search over the whole text gives,
`text[:p]` where p is the earliest start of any stop string (the shortest stop string wins when
several start at p). The stop string and everything after it are never emitted.

To get that on a stream, text is held back while it might still be the start of a stop string (the
longest suffix that is a proper prefix of one). A stop string found at p is final only when no held
candidate starts before p, since a longer stop string that started earlier could still complete.
The held text is never longer than the longest stop string, so each feed costs O(that length).

It knows only strings: nothing of tokens, tokenizers or the engine (which stops the request when a
match is reported).
"""

from __future__ import annotations

from collections.abc import Iterable


class StopStringMatcher:
    """Finds the first stop string in a text that arrives in pieces; holds back what might start one.

    After a match, or after `flush`, the stream is over: `feed` returns `("", None)`, `flush` "".
    """

    def __init__(self, stop_strings: Iterable[str]):
        stops = list(dict.fromkeys(stop_strings))  # duplicates dropped, order kept
        for index, stop in enumerate(stops):
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"stop_strings[{index}]={stop!r}: must be a non-empty string")
        self._stops = tuple(stops)
        self._held = ""
        self._matched: str | None = None
        self._finished = False

    @property
    def matched(self) -> str | None:
        """The stop string that ended the stream, or None."""
        return self._matched

    def feed(self, delta: str) -> tuple[str, str | None]:
        """(text safe to emit now, the stop string matched or None) after `delta` arrives."""
        if self._finished:
            return "", None
        self._held += delta
        return self._release(stream_ended=False)

    def flush(self) -> str:
        """At the end of the stream: the held text, cut before a stop string if one is complete in it.

        A stop string can be complete yet unreported only while a longer one that starts earlier was
        still possible; with the stream over that one cannot complete, so the match stands and
        `matched` names it.
        """
        if self._finished:
            return ""
        text, _ = self._release(stream_ended=True)
        self._finished = True
        return text

    def _release(self, stream_ended: bool) -> tuple[str, str | None]:
        held = self._held
        match_at, stop = self._earliest_match(held)
        candidate_at = len(held) if stream_ended else self._earliest_candidate(held)
        if stop is not None and match_at <= candidate_at:
            self._matched = stop
            self._finished = True
            self._held = ""
            return held[:match_at], stop
        self._held = held[candidate_at:]
        return held[:candidate_at], None

    def _earliest_match(self, text: str) -> tuple[int, str | None]:
        """(start, stop string) of the earliest complete stop string, shortest first on a tie."""
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            at = text.find(stop)
            if at >= 0 and (best is None or (at, len(stop)) < best[:2]):
                best = (at, len(stop), stop)
        return (len(text), None) if best is None else (best[0], best[2])

    def _earliest_candidate(self, text: str) -> int:
        """Where the longest suffix of `text` that is a proper prefix of a stop string starts.

        len(text) when there is none. A stop string that started earlier and is not a suffix here
        has already failed, so this is the earliest place a not-yet-complete match could start.
        """
        earliest = len(text)
        for stop in self._stops:
            # Only suffixes longer than the best so far can move it earlier.
            for length in range(min(len(stop) - 1, len(text)), len(text) - earliest, -1):
                if text.endswith(stop[:length]):
                    earliest = len(text) - length
                    break
        return earliest
