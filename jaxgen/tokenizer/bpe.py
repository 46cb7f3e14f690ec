"""BPE tokenizer run by the HF `tokenizers` library (SmolLM2, GPT-2 style byte-level vocabularies).

Built either from a checkpoint's `tokenizer.json` (any model that library reads, used as written) or
from a GGUF byte-level vocabulary (`tokenizer.ggml.model='gpt2'`): tokens, merges and token types.

Pre-tokenizer for GGUF files. A GGUF names its split rule only by `tokenizer.ggml.pre`. For
`pre='smollm'` the two references disagree:
- llama.cpp's 'smollm' type first cuts every digit (`\\p{N}`) out on its own, then applies the GPT-2
  regex, as SmolLM2's original `tokenizer.json` does with `Digits(individual_digits=True)`;
- HF's GGUF loader has no entry for 'smollm' and keeps `GPT2Tokenizer`'s plain ByteLevel pre-tokenizer
  (the GPT-2 regex, no digit split).
The vocabulary has only single-digit tokens and no merge involving a digit, so digits themselves come
out the same either way. They differ on whitespace before a digit: in "x   1" the GPT-2 regex keeps
one space to join " 1" (`ĠĠ`, `Ġ`, `1`) while the digit split leaves the whole run (`ĠĠĠ`, `1`). We
follow HF: jaxgen's contract is agreement with HF's tokenizer built from the same file, which is what
the parity tests pin. A `tokenizer.json` keeps its own pre-tokenizer, digits split included.

Only the pre types with that plain GPT-2 split are accepted; another value raises rather than
silently splitting text differently from the model's training.
It knows nothing about GGUF reading or chat templates.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from jaxgen.tokenizer.base import Tokenizer
from jaxgen.tokenizer.sentencepiece_proto import CONTROL, USER_DEFINED  # GGUF token types use this numbering
from jaxgen.tokenizer.settings import TokenizerSettings

TOKENIZER_FILE = "tokenizer.json"
GPT2_SPLIT_PRE_TYPES = ("default", "gpt2", "smollm")


class BPETokenizer(Tokenizer):
    """A `tokenizers.Tokenizer`; BOS is added by us, never by the library's post-processor."""

    kind = "bpe"

    def __init__(self, backend: tokenizers.Tokenizer, settings: TokenizerSettings):
        self._backend = backend
        super().__init__(settings)

    @classmethod
    def from_file(cls, path: str | os.PathLike, settings: TokenizerSettings) -> BPETokenizer:
        return cls(load_backend(path), settings)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def id_to_piece(self, id: int) -> str:
        piece = self._backend.id_to_token(id)
        if piece is None:
            raise ValueError(f"token id {id}: must be in [0, vocab_size={self.vocab_size})")
        return piece

    def piece_to_id(self, piece: str) -> int | None:
        return self._backend.token_to_id(piece)

    def post_processor_adds(self, id: int) -> bool:
        """Whether the library's own post-processor (from a tokenizer.json) puts `id` first."""
        ids = self._backend.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == id

    def _encode_text(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def _save_model(self, directory: Path) -> str:
        self._backend.save(str(directory / TOKENIZER_FILE))
        return TOKENIZER_FILE


def load_backend(path: str | os.PathLike) -> tokenizers.Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist; expected a {TOKENIZER_FILE}")
    return tokenizers.Tokenizer.from_file(str(path))


def byte_level_backend(
    tokens: Sequence[str], merges: Sequence[str], types: Sequence[int], pre_type: str
) -> tokenizers.Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from GGUF `tokens`, `merges` ("a b") and `types`."""
    if pre_type not in GPT2_SPLIT_PRE_TYPES:
        raise ValueError(
            f"tokenizer.ggml.pre={pre_type!r} is not supported; expected one of {GPT2_SPLIT_PRE_TYPES} "
            "(byte-level vocabularies split with the GPT-2 regex)"
        )
    if len(types) != len(tokens):
        raise ValueError(f"len(token_type)={len(types)}: must equal len(tokens)={len(tokens)}")
    spelling = _byte_spelling()
    alphabet = set(spelling)
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        # Byte-level tokens are stored in the byte alphabet; some special ones are stored as plain
        # UTF-8 instead, and are spelled into the alphabet so the model can hold them.
        spelled = token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))
        if spelled in vocab:
            raise ValueError(f"token {index} {token!r} is spelled {spelled!r} like token {vocab[spelled]}")
        vocab[spelled] = index
    model = models.BPE(vocab=vocab, merges=[_merge_pair(i, m) for i, m in enumerate(merges)], fuse_unk=False)
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # A control token outside the byte alphabet is a mislabel (llama.cpp marks some so); the model
    # never sees it as a whole, and adding it would grow the vocabulary past the embedding table.
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, types, strict=True)
        if kind == CONTROL and set(t) <= alphabet
    ]
    user_defined = [
        AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types, strict=True) if k == USER_DEFINED
    ]
    backend.add_special_tokens(special)
    backend.add_tokens([t for t in user_defined if t.content in vocab])
    return backend


def _merge_pair(index: int, merge: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep or not left or not right or " " in right:
        raise ValueError(f"merges[{index}]={merge!r}: expected two tokens separated by one space")
    return left, right


def _byte_spelling() -> list[str]:
    """GPT-2's byte alphabet: entry b is the printable character that stands for byte b."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {b: chr(b) for b in printable}
    # The remaining bytes (controls, space, ...) take the code points from 256 on, in byte order.
    for offset, b in enumerate(b for b in range(256) if b not in spelling):
        spelling[b] = chr(256 + offset)
    return [spelling[b] for b in range(256)]
