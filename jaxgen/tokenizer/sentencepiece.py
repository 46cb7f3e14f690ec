"""SentencePiece tokenizer (Gemma, Llama 2 style vocabularies) behind the common interface.

Wraps `sentencepiece.SentencePieceProcessor` loaded from a serialized `ModelProto`, either a
checkpoint's `tokenizer.model` or one rebuilt from GGUF metadata by `sentencepiece_proto`.

Two things SentencePiece does differently from HF, fixed here so our ids match HF's:
- It never matches CONTROL pieces in text, so a literal `<start_of_turn>` (which every chat template
  writes) would be cut into `<`, `start`, `_of`, ... . We split control-token strings out first and
  emit their ids (`SpecialTokenSplitter`).
- Its `decode` drops control pieces, writes <unk> as " ⁇ " and replaces only the invalid bytes of a
  byte run. HF writes special pieces as their strings (or drops them with `skip_special_tokens`) and
  replaces every byte of an invalid run, so decoding is done here, from the pieces, as HF does it.
It knows nothing about GGUF or chat templates.
"""

from __future__ import annotations

import os
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from jaxgen.tokenizer.base import Tokenizer
from jaxgen.tokenizer.settings import TokenizerSettings
from jaxgen.tokenizer.special_tokens import SpecialTokenSplitter

MODEL_FILE = "tokenizer.model"
WHITESPACE = "\u2581"  # "▁", how SentencePiece spells a space inside pieces


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model plus the special-token handling HF applies on top of it."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, settings: TokenizerSettings):
        self._model_proto = bytes(model_proto)
        self._processor = spm.SentencePieceProcessor(model_proto=self._model_proto)
        size = self._processor.get_piece_size()
        control = {self._processor.id_to_piece(i): i for i in range(size) if self._processor.is_control(i)}
        self._splitter = SpecialTokenSplitter(control)
        unknown = {i for i in range(size) if self._processor.is_unknown(i)}
        self._special_ids = frozenset(control.values()) | unknown
        # A model that prepends "▁" to the text takes it off again when decoding, as HF's does.
        self._strip_leading_space = spm_pb2.ModelProto.FromString(self._model_proto).normalizer_spec.add_dummy_prefix
        # Each id's text (its piece with "▁" as a space) and the byte of each `<0xNN>` id: the
        # serving loop decodes every generated token (several times, in windows), and a lookup
        # is ~10x cheaper than asking the processor. Built here (0.12 s for Gemma's 262,144
        # pieces on the CPU box), not on first use, where the first request would wait for it.
        pieces = [self._processor.id_to_piece(i) for i in range(size)]
        self._text_of = [p.replace(WHITESPACE, " ") for p in pieces]
        self._byte_of = {i: int(pieces[i][3:5], 16) for i in range(size)
                         if self._processor.is_byte(i)}
        super().__init__(settings)

    @classmethod
    def from_file(cls, path: str | os.PathLike, settings: TokenizerSettings) -> SentencePieceTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model {str(path)!r} does not exist; expected a {MODEL_FILE} file")
        return cls(path.read_bytes(), settings)

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    def id_to_piece(self, id: int) -> str:
        if not 0 <= id < self.vocab_size:
            raise ValueError(f"token id {id}: must be in [0, vocab_size={self.vocab_size})")
        return self._processor.id_to_piece(id)

    def piece_to_id(self, piece: str) -> int | None:
        id = self._processor.piece_to_id(piece)
        # SentencePiece answers unk_id for any piece it does not know.
        return id if self._processor.id_to_piece(id) == piece else None

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._splitter.split(text):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids.extend(self._processor.encode(part, out_type=int))
        return ids

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        text_of, byte_of, special = self._text_of, self._byte_of, self._special_ids
        out: list[str] = []
        byte_run = bytearray()
        for id in ids:
            if skip_special_tokens and id in special:
                continue  # skipped before byte runs are joined, as HF does
            byte = byte_of.get(id)
            if byte is not None:
                byte_run.append(byte)
                continue
            _flush_bytes(byte_run, out)
            out.append(text_of[id])
        _flush_bytes(byte_run, out)
        text = "".join(out)
        return text[1:] if self._strip_leading_space and text.startswith(" ") else text

    def _save_model(self, directory: Path) -> str:
        (directory / MODEL_FILE).write_bytes(self._model_proto)
        return MODEL_FILE


def _flush_bytes(byte_run: bytearray, out: list[str]) -> None:
    """Appends a run of `<0xNN>` byte pieces as text and empties it.

    A run that is not valid UTF-8 becomes one U+FFFD per byte, valid bytes included: that is HF's
    ByteFallback rule, and following it keeps our decode equal to HF's on any id sequence (a model
    can emit any). SentencePiece's own decode would keep the valid bytes.
    """
    if not byte_run:
        return
    try:
        out.append(byte_run.decode("utf-8"))
    except UnicodeDecodeError:
        out.append("\ufffd" * len(byte_run))
    byte_run.clear()
