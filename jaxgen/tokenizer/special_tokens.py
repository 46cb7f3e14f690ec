"""Finding literal control-token strings (`<bos>`, `<start_of_turn>`) inside text.

SentencePiece never matches CONTROL pieces in input text: `"<bos>"` typed by a user, or written by a
chat template, is cut into `<`, `bos`, `>`. HF tokenizers (and llama.cpp with `parse_special`) match
them whole and emit their ids, and chat templates rely on that. This module cuts such strings out so
the caller can emit their ids and encode only the text between them.

Matching is leftmost-longest, the rule HF's added-token matcher uses: at the first position where
any token starts, the longest token starting there wins.

It knows only strings and ids; it knows nothing about how the text between the tokens is encoded.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping


class SpecialTokenSplitter:
    """Splits text into plain-text runs and special-token ids.

    `tokens` maps each special string to its id. Lookup is by hashing candidate substrings, one per
    distinct token length, at each position where some token could start, so the cost does not grow
    with the number of tokens (Gemma has 6,249 control pieces, mostly `<unusedN>`).
    """

    def __init__(self, tokens: Mapping[str, int]):
        for token in tokens:
            if not token:
                raise ValueError("special token '' (empty string): special tokens must be non-empty")
        self._ids = dict(tokens)
        self._lengths = sorted({len(t) for t in self._ids}, reverse=True)
        first_chars = sorted({t[0] for t in self._ids})
        self._starts = re.compile("[" + "".join(re.escape(c) for c in first_chars) + "]") if first_chars else None

    def __bool__(self) -> bool:
        return bool(self._ids)

    def split(self, text: str) -> Iterator[str | int]:
        """Yields non-empty text runs (str) and special-token ids (int), in text order."""
        if self._starts is None:
            if text:
                yield text
            return
        run_start = 0
        position = 0
        while True:
            found = self._starts.search(text, position)
            if found is None:
                break
            start = found.start()
            token_id, length = self._match_at(text, start)
            if token_id is None:
                position = start + 1
                continue
            if start > run_start:
                yield text[run_start:start]
            yield token_id
            run_start = position = start + length
        if run_start < len(text):
            yield text[run_start:]

    def _match_at(self, text: str, start: int) -> tuple[int | None, int]:
        remaining = len(text) - start
        for length in self._lengths:
            if length > remaining:
                continue
            token_id = self._ids.get(text[start : start + length])
            if token_id is not None:
                return token_id, length
        return None, 0
