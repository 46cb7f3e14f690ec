"""The tokenizer interface the serving stack sees: text ⇄ ids, special ids, chat rendering.

`Tokenizer` owns everything that is the same for every vocabulary format: the BOS rule, stop ids,
chat-template rendering and `save`. A subclass supplies only the vocabulary-specific parts
(`_encode_text`, `_decode_ids`, `id_to_piece`, `piece_to_id`, `vocab_size`, `from_file`, `_save_model`)
and builds its vocabulary before calling `Tokenizer.__init__`, which range-checks the special ids.
It knows nothing about GGUF or HF checkpoint layouts; see `gguf_loader` and `directory`.
"""

from __future__ import annotations

import abc
import copy
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar

from jaxgen.tokenizer.chat_template import render_chat_template
from jaxgen.tokenizer.settings import CONFIG_FILE, TokenizerSettings


class Tokenizer(abc.ABC):
    """Text to token ids and back, for one model.

    `encode(text)` treats literal special-token strings in `text` (`<start_of_turn>`, `<|im_end|>`)
    as those tokens, as HF does; that is what lets a rendered chat template be encoded directly.
    """

    kind: ClassVar[str]  # names the subclass in tokenizer_config.json

    def __init__(self, settings: TokenizerSettings):
        self.settings = settings
        self._skipped: dict[int, bool] = {}  # `skips` answers, per id
        ids = {"bos_id": settings.bos_id, "eos_id": settings.eos_id, "pad_id": settings.pad_id}
        ids.update({f"stop_ids[{i}]": s for i, s in enumerate(sorted(settings.stop_ids))})
        for name, value in ids.items():
            if value is not None and value >= self.vocab_size:
                raise ValueError(f"{name}={value}: must be < vocab_size={self.vocab_size}")

    # -- vocabulary-specific parts -------------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def from_file(cls, path: str | os.PathLike, settings: TokenizerSettings) -> Tokenizer:
        """Loads the vocabulary file `_save_model` writes."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @abc.abstractmethod
    def id_to_piece(self, id: int) -> str:
        """The vocabulary entry for `id`, as the vocabulary spells it (`▁the`, `Ġthe`, `<0x0A>`)."""

    @abc.abstractmethod
    def piece_to_id(self, piece: str) -> int | None:
        """The id of vocabulary entry `piece`, or None when there is none."""

    @abc.abstractmethod
    def _encode_text(self, text: str) -> list[int]:
        """Ids for `text`, special-token strings included, with no BOS added."""

    @abc.abstractmethod
    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str: ...

    @abc.abstractmethod
    def _save_model(self, directory: Path) -> str:
        """Writes the vocabulary file into `directory`; returns its file name."""

    # -- shared behaviour -----------------------------------------------------------------------

    @property
    def bos_id(self) -> int | None:
        return self.settings.bos_id

    @property
    def eos_id(self) -> int:
        return self.settings.eos_id

    @property
    def pad_id(self) -> int | None:
        return self.settings.pad_id

    @property
    def stop_ids(self) -> frozenset[int]:
        return self.settings.stop_ids

    @property
    def add_bos(self) -> bool:
        return self.settings.add_bos

    @property
    def chat_template(self) -> str:
        return self.settings.chat_template

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids for `text`; `add_bos=None` follows the model's own rule (`self.add_bos`)."""
        if not isinstance(text, str):
            raise TypeError(f"text={type(text).__name__}: expected str")
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos=True: this tokenizer has no BOS token (bos_id=None)")
        ids = self._encode_text(text)
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text for `ids`; special tokens appear as their strings unless `skip_special_tokens`."""
        ids = list(map(int, ids))
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):  # the check in C, then the name
            size = self.vocab_size
            bad = next(i for i in ids if not 0 <= i < size)
            raise ValueError(f"token id {bad}: must be in [0, vocab_size={size})")
        return self._decode_ids(ids, skip_special_tokens)

    def skips(self, id: int) -> bool:
        """True when `decode(..., skip_special_tokens=True)` leaves `id` out: alone it writes
        text with special tokens kept and none without. (A plain piece that decodes to "" alone,
        such as a lone "▁" under a dummy prefix, is not skipped: it writes text next to others.)
        Answered once per id for the tokenizer's lifetime: every request's detokenizer asks about
        the same ids, at every output token."""
        skipped = self._skipped.get(id)
        if skipped is None:
            skipped = self.decode([id], skip_special_tokens=True) == "" and \
                self.decode([id], skip_special_tokens=False) != ""
            self._skipped[id] = skipped
        return skipped

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The conversation rendered as text, with this model's template."""
        if not self.chat_template:
            raise ValueError("chat_template='': this tokenizer has no chat template to render messages with")
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._piece_or_empty(self.bos_id),
            eos_token=self._piece_or_empty(self.eos_id),
        )

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered conversation. No BOS is added: the template writes its own `<bos>`."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_bos=False)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the vocabulary file and `tokenizer_config.json`; `load_tokenizer` reads them back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model_file = self._save_model(directory)
        config = self.settings.to_config_file(self.kind, model_file, self.id_to_piece)
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    def with_settings(self, settings: TokenizerSettings) -> Tokenizer:
        """The same vocabulary with other settings (special ids, BOS rule, chat template)."""
        clone = copy.copy(self)  # the vocabulary objects are only read, so sharing them is safe
        Tokenizer.__init__(clone, settings)
        return clone

    def _piece_or_empty(self, id: int | None) -> str:
        return "" if id is None else self.id_to_piece(id)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"stop_ids={sorted(self.stop_ids)}, add_bos={self.add_bos})"
        )
