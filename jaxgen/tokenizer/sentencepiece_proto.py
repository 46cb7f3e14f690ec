"""Rebuilding a SentencePiece `ModelProto` (a `tokenizer.model`) from a bare vocabulary listing.

A GGUF file of `tokenizer.ggml.model='llama'` keeps the pieces, their scores and their types, but not
the model file itself. This module writes those back into a serialized BPE `ModelProto` that
`sentencepiece.SentencePieceProcessor` loads. It knows the proto's fields and the few places where a
GGUF listing differs from what SentencePiece expects (<unk> typed CONTROL); model-specific fixes (Gemma's
whitespace pieces) are the caller's. It knows nothing about GGUF reading (the caller passes plain
lists) nor about encoding.

Normalisation is what llama.cpp applies to these files: identity (no NFKC), no dummy prefix, no
collapsing of whitespace, spaces escaped as `▁`. A file saying `add_space_prefix=True` is rebuilt with
a dummy prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

from sentencepiece import sentencepiece_model_pb2 as spm_pb2

Piece = spm_pb2.ModelProto.SentencePiece
# GGUF's `tokenizer.ggml.token_type` numbering is SentencePiece's own (llama.cpp copied it).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = Piece.NORMAL, Piece.UNKNOWN, Piece.CONTROL, Piece.USER_DEFINED
UNUSED, BYTE = Piece.UNUSED, Piece.BYTE


def build_bpe_model_proto(
    pieces: Sequence[str],
    scores: Sequence[float],
    types: Sequence[int],
    *,
    unk_id: int,
    bos_id: int | None,
    eos_id: int | None,
    pad_id: int | None,
    add_dummy_prefix: bool = False,
) -> bytes:
    """A serialized BPE `ModelProto` holding `pieces` with their `scores` and `types`."""
    _check_lengths(pieces, scores, types)
    if not 0 <= unk_id < len(pieces):
        raise ValueError(f"unk_id={unk_id}: must be in [0, {len(pieces)})")
    model = spm_pb2.ModelProto()
    seen: dict[str, int] = {}
    for index, (text, score, kind) in enumerate(zip(pieces, scores, types, strict=True)):
        piece = model.pieces.add()
        piece.piece = text
        piece.score = float(score)
        piece.type = _piece_type(index, kind, unk_id)
        if text in seen:
            raise ValueError(f"piece {index} {text!r} repeats piece {seen[text]}: SentencePiece needs every piece once")
        seen[text] = index

    byte_pieces = sum(1 for p in model.pieces if p.type == BYTE)
    trainer = model.trainer_spec
    trainer.model_type = spm_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(pieces)
    # Byte fallback needs all 256 `<0xNN>` pieces; without them unknown text maps to <unk>.
    trainer.byte_fallback = byte_pieces == 256
    trainer.allow_whitespace_only_pieces = True
    for name, value in (("unk", unk_id), ("bos", bos_id), ("eos", eos_id), ("pad", pad_id)):
        setattr(trainer, f"{name}_id", -1 if value is None else value)
        if value is not None:
            # SentencePiece finds bos/eos/pad by these names, not by the ids above.
            setattr(trainer, f"{name}_piece", model.pieces[value].piece)

    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = add_dummy_prefix
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return model.SerializeToString()


def _check_lengths(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> None:
    if not pieces:
        raise ValueError("pieces=[]: a vocabulary needs at least one piece")
    if len(scores) != len(pieces) or len(types) != len(pieces):
        raise ValueError(
            f"len(scores)={len(scores)}, len(types)={len(types)}: must both equal len(pieces)={len(pieces)}"
        )


def _piece_type(index: int, kind: int, unk_id: int) -> int:
    # SentencePiece wants exactly one UNKNOWN piece; Gemma files mark <unk> CONTROL instead.
    if index == unk_id:
        return UNKNOWN
    if kind == UNKNOWN:
        return CONTROL
    if kind not in (NORMAL, CONTROL, USER_DEFINED, UNUSED, BYTE):
        raise ValueError(
            f"token_type[{index}]={kind}: expected 1 (normal), 2 (unknown), 3 (control), "
            "4 (user-defined), 5 (unused) or 6 (byte)"
        )
    return kind
