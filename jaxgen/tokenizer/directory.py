"""Loading a tokenizer from a directory: one written by `Tokenizer.save`, or an HF checkpoint's.

`Tokenizer.save` writes the vocabulary file plus a `tokenizer_config.json` whose "jaxgen" section holds
every setting explicitly; `load_tokenizer` reads exactly that back (our Orbax checkpoint directories
carry it). `load_hf_tokenizer` reads what an HF checkpoint has instead: `tokenizer.json` (preferred, as
HF prefers it) or `tokenizer.model`, with special tokens named by string in `tokenizer_config.json` and
the chat template there or in `chat_template.jinja`.
It knows file layouts only; encoding belongs to the tokenizer classes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jaxgen.tokenizer import bpe, sentencepiece
from jaxgen.tokenizer.base import Tokenizer
from jaxgen.tokenizer.bpe import BPETokenizer
from jaxgen.tokenizer.chat_template import default_chat_template, end_of_turn_ids
from jaxgen.tokenizer.sentencepiece import SentencePieceTokenizer
from jaxgen.tokenizer.settings import CONFIG_FILE, JAXGEN_KEY, TokenizerSettings

CHAT_TEMPLATE_FILE = "chat_template.jinja"
_KINDS: dict[str, type[Tokenizer]] = {cls.kind: cls for cls in (SentencePieceTokenizer, BPETokenizer)}


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer `Tokenizer.save(directory)` wrote."""
    config_path = Path(directory) / CONFIG_FILE
    ours = _read_json(config_path).get(JAXGEN_KEY)
    if not isinstance(ours, dict):
        raise ValueError(
            f"{config_path}: no {JAXGEN_KEY!r} section, so it was not written by Tokenizer.save; "
            "use load_hf_tokenizer for an HF checkpoint directory"
        )
    kind = ours.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"{config_path}: field 'kind'={kind!r} is not supported; expected one of {sorted(_KINDS)}")
    model_file = ours.get("model_file")
    if not isinstance(model_file, str) or Path(model_file).name != model_file:
        raise ValueError(f"{config_path}: field 'model_file'={model_file!r}; expected a file name in the directory")
    settings = TokenizerSettings.from_json(ours, str(config_path))
    return _KINDS[kind].from_file(Path(directory) / model_file, settings)


def load_hf_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer of an HF checkpoint directory (`tokenizer.json` or `tokenizer.model`)."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    config = _read_json(config_path)
    # Special tokens are named by string, so the vocabulary is loaded first, with provisional settings.
    tokenizer = _load_vocabulary(directory, TokenizerSettings(eos_id=0))
    return tokenizer.with_settings(_hf_settings(tokenizer, config, config_path))


def _load_vocabulary(directory: Path, settings: TokenizerSettings) -> Tokenizer:
    if (directory / bpe.TOKENIZER_FILE).is_file():
        return BPETokenizer.from_file(directory / bpe.TOKENIZER_FILE, settings)
    if (directory / sentencepiece.MODEL_FILE).is_file():
        return SentencePieceTokenizer.from_file(directory / sentencepiece.MODEL_FILE, settings)
    raise FileNotFoundError(
        f"{directory}: has neither {bpe.TOKENIZER_FILE} nor {sentencepiece.MODEL_FILE}; "
        "an HF checkpoint's tokenizer needs one of them"
    )


def _hf_settings(tokenizer: Tokenizer, config: dict[str, Any], config_path: Path) -> TokenizerSettings:
    lookup = tokenizer.piece_to_id
    eos_id = _special_id(config, "eos_token", lookup, config_path)
    if eos_id is None:
        raise ValueError(f"{config_path}: field 'eos_token' is missing; expected the EOS token string")
    bos_id = _special_id(config, "bos_token", lookup, config_path)
    add_bos = config.get("add_bos_token")
    if add_bos is None:
        # Without the flag HF goes by the tokenizer.json post-processor; LlamaTokenizer adds BOS by default.
        if isinstance(tokenizer, BPETokenizer):
            add_bos = bos_id is not None and tokenizer.post_processor_adds(bos_id)
        else:
            add_bos = bos_id is not None
    return TokenizerSettings(
        eos_id=eos_id,
        bos_id=bos_id,
        pad_id=_special_id(config, "pad_token", lookup, config_path),
        stop_ids=end_of_turn_ids(lookup),
        add_bos=bool(add_bos),
        chat_template=_hf_chat_template(config_path.parent, config) or default_chat_template(lookup),
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer config {str(path)!r} does not exist; expected a {CONFIG_FILE}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a {type(data).__name__}; expected a JSON object")
    return data


def _special_id(config: dict[str, Any], field: str, lookup, source: Path) -> int | None:
    token = config.get(field)
    if isinstance(token, dict):  # older files serialise an AddedToken: {"content": "<bos>", ...}
        token = token.get("content")
    if token is None:
        return None
    id = lookup(token)
    if id is None:
        raise ValueError(f"{source}: field {field!r}={token!r} is not in the vocabulary")
    return id


def _hf_chat_template(directory: Path, config: dict[str, Any]) -> str:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template:
        return template
    template_file = directory / CHAT_TEMPLATE_FILE
    return template_file.read_text(encoding="utf-8") if template_file.is_file() else ""
