"""Incremental detokenization: the new text each generation step adds, for one request.

`IncrementalDetokenizer.push(ids)` returns only the text that `ids` add to the output, so that the
deltas joined equal `tokenizer.decode(output_ids)` wherever the output ends on a whole character.

Why not decode each token alone: a token's text depends on its neighbours. Byte pieces
(SentencePiece `<0xF0>`, byte-level BPE `ðŁ`) form a character only together, and a SentencePiece
model with a dummy prefix drops the leading space of whatever piece comes first in a decode. So,
as vLLM and HF TGI do, the new tokens are decoded together with a few tokens of left context whose
text was already emitted, and the delta is what lies past the context's own text. The window is
the context plus the tokens not yet released, so the cost per token does not grow with the output.

Rules the window keeps (each is why the delta is right):
- The context always starts on a character boundary and, after the first release, holds at least
  one token that writes text; so a decoder's "first piece" rule applies to the context, not to the
  new tokens, exactly as in a decode of the whole output.
- Tokens that `skip_special_tokens` drops never enter the window: decode() skips them before it
  joins bytes, so leaving them out changes nothing, and a context of only skipped tokens would
  otherwise write no text.
- A trailing U+FFFD means a character whose bytes have not all arrived; it is held back. Text before
  it is released (a later byte cannot change an earlier whole character).

Limits: the guarantee is for ids that form valid UTF-8. A model can emit bytes that never form a
character; those come out as U+FFFD (as decode() writes them) once `MAX_PENDING_TOKENS` tokens go by
with no character boundary, or at `flush()`. With SentencePiece's rule that a whole invalid byte run
becomes U+FFFD, a valid character already released can then be re-spelled by decode() as U+FFFD;
text once emitted is never taken back. A prompt that ends inside a character is used as it is.

It knows only `Tokenizer.decode` and `skips`; nothing of stop strings (see `stop_strings`), sampling or the engine.
"""

from __future__ import annotations

from collections.abc import Iterable

from jaxgen.tokenizer.base import Tokenizer

REPLACEMENT = "\ufffd"  # what decode() writes for bytes that are not (yet) a character
PROMPT_CONTEXT_TOKENS = 5  # vLLM's choice: enough left context for every decoder rule we know
MAX_CHAR_TOKENS = 4  # a UTF-8 character is at most 4 bytes, so it spans at most 4 tokens
# Tokens waited on for a character boundary before trailing U+FFFD is taken as final. Valid text in
# the vocabularies we serve reaches a boundary within MAX_CHAR_TOKENS; the margin covers tokens
# that end one character and start the next.
MAX_PENDING_TOKENS = 16


class IncrementalDetokenizer:
    """Turns one request's output ids, pushed as they are sampled, into text deltas.

    `prompt_ids` supply the left context of the first output token (so its leading space comes out
    as in `decode(prompt + output)` minus `decode(prompt)`); they are never emitted themselves.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Iterable[int] = (), skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # The window: ids[:read] are context, their text emitted; ids[read:] are pending.
        self._ids = self._prompt_context([int(i) for i in prompt_ids])
        self._read = len(self._ids)
        self._context_text = self._decode(self._ids)
        self._pending_emitted = 0  # chars of the pending tokens' text already released

    def push(self, token_ids: Iterable[int]) -> str:
        """The complete text the new `token_ids` add; an unfinished character is held back.

        Several ids at once (the engine pushes a whole decode step's, e.g. 16) are decoded with
        the window in one call when they end on a character boundary: two decodes for the lot
        instead of two per token. When the last ids leave a character unfinished (a character
        spans at most MAX_CHAR_TOKENS tokens), the ids before that character are released in
        one call the same way and only the last few go one at a time, where the holding rules
        apply per token; with no boundary that near (bytes that are not UTF-8), all go one at a
        time. For ids that form valid UTF-8 the text is the same either way
        (tests/test_detokenizer.py compares them); on byte runs that are not UTF-8 the batch is
        decode()'s own spelling of the run, where one at a time may have released its first
        valid bytes already."""
        new = [id for id in map(int, token_ids) if not self._is_dropped(id)]
        if len(new) > 1:
            text = self._decode(self._ids + new)
            if not text.endswith(REPLACEMENT):
                return self._take(new, text)
            for k in range(1, min(MAX_CHAR_TOKENS, len(new) - 1) + 1):
                text = self._decode(self._ids + new[:-k])
                if not text.endswith(REPLACEMENT):
                    return self._take(new[:-k], text) + "".join(map(self._push_one, new[-k:]))
        return "".join(self._push_one(id) for id in new)

    def _take(self, ids: list[int], text: str) -> str:
        """Appends `ids`, whose window decodes to `text` ending on a character boundary, and
        releases that text: they become the context."""
        self._ids += ids
        delta = self._release(text)
        self._make_pending_context()
        return delta

    def flush(self) -> str:
        """Everything held back, as decode() writes it now: an unfinished character as U+FFFD."""
        delta = self._release(self._decode(self._ids))
        self._make_pending_context()
        return delta

    def _push_one(self, id: int) -> str:
        """One id that writes text (not dropped): the per-token path."""
        self._ids.append(id)
        text = self._decode(self._ids)
        if text.endswith(REPLACEMENT) and len(self._ids) - self._read < MAX_PENDING_TOKENS:
            return self._release(text.rstrip(REPLACEMENT))
        delta = self._release(text)
        self._make_pending_context()
        return delta

    def _release(self, window_text: str) -> str:
        """The part of `window_text` not emitted yet; `window_text` must be final up to its end."""
        delta = window_text[len(self._context_text) + self._pending_emitted :]
        self._pending_emitted += len(delta)
        return delta

    def _make_pending_context(self) -> None:
        """After the pending tokens are fully released they become the context; the old one goes.

        Called only at a character boundary (or when giving up on one), so the new context starts on
        one. Pending tokens all write text, so the new context is never empty once output exists.
        """
        if len(self._ids) == self._read:
            return  # nothing new: keep the context we have
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._context_text = self._decode(self._ids)
        self._pending_emitted = 0

    def _prompt_context(self, prompt_ids: list[int]) -> list[int]:
        """The last few prompt tokens that write text, starting on a character boundary."""
        reversed_context: list[int] = []
        for id in reversed(prompt_ids):
            if self._is_dropped(id):
                continue
            reversed_context.append(id)
            if len(reversed_context) >= PROMPT_CONTEXT_TOKENS + MAX_CHAR_TOKENS - 1:
                break
            # Starting inside a character would turn its bytes (and, in a SentencePiece byte run,
            # the new bytes after them) into U+FFFD; so reach back to the character's first byte.
            if len(reversed_context) >= PROMPT_CONTEXT_TOKENS:
                if not self._decode(reversed_context[::-1]).startswith(REPLACEMENT):
                    break
        return reversed_context[::-1]

    def _is_dropped(self, id: int) -> bool:
        return self._skip_special_tokens and self._tokenizer.skips(id)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
