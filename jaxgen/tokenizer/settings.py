"""What a tokenizer needs besides its vocabulary: special ids, the BOS rule, the chat template.

`TokenizerSettings` is the one place these live, validated on construction, and the one place that
knows their JSON spelling in `tokenizer_config.json`. It knows nothing about vocabularies, merges or
how text is cut into pieces; range checks against the vocabulary happen in `Tokenizer.__init__`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

CONFIG_FILE = "tokenizer_config.json"
# Our own fields sit under one key, so the HF-style keys beside them (bos_token, add_bos_token,
# chat_template) keep the directory readable by `load_hf_tokenizer` and by HF itself.
JAXGEN_KEY = "jaxgen"


@dataclasses.dataclass(frozen=True)
class TokenizerSettings:
    """Special ids and policies of one tokenizer.

    `stop_ids` are the ids that end a generation (EOS plus end-of-turn markers); `add_bos` is the
    model's own rule for plain `encode`; `chat_template` is a Jinja template, "" when there is none.
    """

    eos_id: int
    bos_id: int | None = None
    pad_id: int | None = None
    stop_ids: frozenset[int] = frozenset()
    add_bos: bool = False
    chat_template: str = ""

    def __post_init__(self):
        ids = {"eos_id": self.eos_id, "bos_id": self.bos_id, "pad_id": self.pad_id}
        ids.update({f"stop_ids[{i}]": s for i, s in enumerate(sorted(self.stop_ids, key=str))})
        for name, value in ids.items():
            if value is None and name in ("bos_id", "pad_id"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r}: must be an int ≥ 0")
        if self.add_bos and self.bos_id is None:
            raise ValueError("add_bos=True with bos_id=None: a tokenizer that adds BOS needs a bos_id")
        # Normalising here means every constructor path gets EOS in the stop set.
        object.__setattr__(self, "stop_ids", frozenset(self.stop_ids) | {self.eos_id})

    def to_json(self) -> dict[str, Any]:
        return {
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "stop_ids": sorted(self.stop_ids),
            "add_bos": self.add_bos,
            "chat_template": self.chat_template,
        }

    def to_config_file(self, kind: str, model_file: str, piece: Callable[[int], str]) -> dict[str, Any]:
        """The whole `tokenizer_config.json`: our fields plus HF's names for the same facts."""
        hf_names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        return {
            JAXGEN_KEY: {"kind": kind, "model_file": model_file, **self.to_json()},
            **{name: piece(i) for name, i in hf_names.items() if i is not None},
            "add_bos_token": self.add_bos,
            **({"chat_template": self.chat_template} if self.chat_template else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str) -> TokenizerSettings:
        """Reads what `to_json` wrote; `source` names the file in error messages."""
        if "eos_id" not in data:
            raise ValueError(f"{source}: field 'eos_id' is missing; expected the id of the EOS token")
        return cls(
            eos_id=data["eos_id"],
            bos_id=data.get("bos_id"),
            pad_id=data.get("pad_id"),
            stop_ids=frozenset(_int_list(data.get("stop_ids", []), "stop_ids", source)),
            add_bos=bool(data.get("add_bos", False)),
            chat_template=data.get("chat_template") or "",
        )


def _int_list(values: Iterable[Any], field: str, source: str) -> list[int]:
    values = list(values)
    bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool)]
    if bad:
        raise ValueError(f"{source}: field {field!r} holds {bad!r}; expected a list of ints")
    return values
