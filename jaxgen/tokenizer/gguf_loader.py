"""Building a `Tokenizer` from the `tokenizer.*` metadata of a GGUF file.

A GGUF carries no tokenizer file, only llama.cpp's metadata keys: `tokenizer.ggml.model` says which
kind ('llama' = SentencePiece, 'gpt2' = byte-level BPE), `tokens`/`scores`/`token_type`/`merges` the
vocabulary, `*_token_id` the special ids, `add_bos_token` the BOS rule and `tokenizer.chat_template`
the template, when there is one. Files without a template (Gemma's) get a built-in one chosen from the
vocabulary. This module reads those keys and hands plain lists to `sentencepiece_proto` / `bpe`; it
knows nothing about how either encodes text.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxgen.tokenizer.base import Tokenizer
from jaxgen.tokenizer.bpe import BPETokenizer, byte_level_backend
from jaxgen.tokenizer.chat_template import default_chat_template, end_of_turn_ids
from jaxgen.tokenizer.sentencepiece import SentencePieceTokenizer
from jaxgen.tokenizer.sentencepiece_proto import NORMAL, UNKNOWN, build_bpe_model_proto
from jaxgen.tokenizer.settings import TokenizerSettings

if TYPE_CHECKING:  # `gguf` is imported only when a GGUF is read: serving hosts may lack it.
    from jaxgen.gguf_reader import GGUFFile

SUPPORTED_MODELS = {"llama": "SentencePiece", "gpt2": "byte-level BPE"}
_MISSING = object()


def tokenizer_from_gguf(reader_or_path: "GGUFFile | str | os.PathLike") -> Tokenizer:
    """The tokenizer a GGUF file describes (pass a path, or a reader already opened on the file)."""
    metadata = _Metadata(_open(reader_or_path))
    model = metadata.get("tokenizer.ggml.model")
    if model not in SUPPORTED_MODELS:
        expected = ", ".join(f"{k!r} ({v})" for k, v in SUPPORTED_MODELS.items())
        raise ValueError(f"{metadata.source}: tokenizer.ggml.model={model!r} is not supported; expected {expected}")
    tokens = metadata.get("tokenizer.ggml.tokens")
    types = metadata.get("tokenizer.ggml.token_type")
    index = {token: i for i, token in reversed(list(enumerate(tokens)))}
    bos_id = metadata.get("tokenizer.ggml.bos_token_id", None)
    settings = TokenizerSettings(
        eos_id=metadata.get("tokenizer.ggml.eos_token_id"),
        bos_id=bos_id,
        pad_id=metadata.get("tokenizer.ggml.padding_token_id", None),
        stop_ids=end_of_turn_ids(index.get),
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
        add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", model == "llama" and bos_id is not None)),
        chat_template=metadata.get("tokenizer.chat_template", None) or default_chat_template(index.get),
    )
    if model == "llama":
        scores = metadata.get("tokenizer.ggml.scores")
        if str(metadata.get("general.architecture", "")).startswith("gemma"):
            tokens, scores, types = gemma_vocabulary(tokens, types)
        proto = build_bpe_model_proto(
            tokens,
            scores,
            types,
            unk_id=_unknown_id(metadata, types),
            bos_id=settings.bos_id,
            eos_id=settings.eos_id,
            pad_id=settings.pad_id,
            add_dummy_prefix=bool(metadata.get("tokenizer.ggml.add_space_prefix", False)),
        )
        return SentencePieceTokenizer(proto, settings)
    merges = metadata.get("tokenizer.ggml.merges")
    pre_type = metadata.get("tokenizer.ggml.pre", "default")
    return BPETokenizer(byte_level_backend(tokens, merges, types, pre_type), settings)


def gemma_vocabulary(tokens: list[str], types: list[int]) -> tuple[list[str], list[float], list[int]]:
    """Gemma's GGUF vocabulary made into the SentencePiece BPE model HF builds from it.

    - Pieces that are runs of spaces are stored with real spaces ("   "). SentencePiece escapes every
      input space to ▁ before matching, so they are respelled "▁▁▁" or they could never match.
    - They are typed USER_DEFINED, which SentencePiece matches whole, longest first: 33 spaces become
      31 + 2. HF's loader never registers them as added tokens (it looks them up under the space
      spelling after respelling them), so for HF they are ordinary BPE pieces, merged pairwise:
      33 spaces become 16 + 17. They are typed NORMAL here to agree with HF.
    - Merge priority is file position, as in HF's loader (`GemmaTokenizer` gets merges sorted by
      position): the file gives user-defined pieces a flat -1000, which says nothing about order, and
      the normal pieces' scores already fall strictly with position, so -position keeps their order.
    """
    respelled, kinds = list(tokens), list(types)
    for index, token in enumerate(tokens):
        if token and not token.strip(" "):
            respelled[index] = "\u2581" * len(token)
            kinds[index] = NORMAL
    return respelled, [-float(i) for i in range(len(tokens))], kinds


def _unknown_id(metadata: _Metadata, types: list[int]) -> int:
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id", None)
    if unk_id is not None:
        return unk_id
    # Files converted from a tokenizer.model may leave the key out; the piece typed UNKNOWN says it.
    unknown = [i for i, kind in enumerate(types) if kind == UNKNOWN]
    if len(unknown) != 1:
        raise ValueError(
            f"{metadata.source}: metadata key 'tokenizer.ggml.unknown_token_id' is missing and "
            f"{len(unknown)} tokens are typed unknown (2); expected the key or exactly one such token"
        )
    return unknown[0]


def _open(reader_or_path: "GGUFFile | str | os.PathLike") -> "GGUFFile":
    from jaxgen.gguf_reader import GGUFFile, GGUFFormatError

    if isinstance(reader_or_path, GGUFFile):
        return reader_or_path
    path = Path(reader_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    try:
        return GGUFFile(path)
    except GGUFFormatError as e:
        raise ValueError(f"GGUF file {str(path)!r}: {e}") from None


class _Metadata:
    """Key lookup on a GGUF reader, with errors that name the file and the key."""

    def __init__(self, reader: "GGUFFile"):
        self._fields = reader.fields
        self.source = f"GGUF file {reader.path!r}"

    def get(self, key: str, default: Any = _MISSING) -> Any:
        field = self._fields.get(key)
        if field is not None:
            return field.contents()
        if default is _MISSING:
            raise ValueError(f"{self.source}: metadata key {key!r} is missing; a tokenizer needs it")
        return default
