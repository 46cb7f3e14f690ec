"""Rendering a conversation to text with a Jinja chat template, the way HF renders it.

The environment matches HF's `apply_chat_template`: a sandbox (templates come from checkpoints, so
they are untrusted code), `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a `tojson`
that does not HTML-escape, `raise_exception` and `strftime_now`, and the variables `messages`,
`add_generation_prompt`, `bos_token` and `eos_token`. HF's `{% generation %}` tag (assistant-token
masks for training) is not supported; serving never needs it.

It also holds the built-in Gemma turn format for checkpoints that carry no template (Gemma GGUF
files do not). It knows nothing about token ids: rendering produces text, the tokenizer encodes it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """Raised by a template's `raise_exception(...)`: the conversation does not fit the template."""


# Gemma's turn format, as the official Gemma 3 template writes it: the system message has no turn
# of its own (Gemma was not trained with one), so it is prepended to the first user turn, followed
# by a blank line; turn contents are stripped; "assistant" is spelled "model".
GEMMA_CHAT_TEMPLATE = """\
{%- set allowed = "'system' (first message only), 'user', 'assistant', 'model'" -%}
{{ bos_token }}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system_prefix = messages[0]['content'] + '\\n\\n' -%}
  {%- set turns = messages[1:] -%}
  {%- set offset = 1 -%}
{%- else -%}
  {%- set system_prefix = '' -%}
  {%- set turns = messages -%}
  {%- set offset = 0 -%}
{%- endif -%}
{%- for message in turns -%}
  {%- set role = message['role'] -%}
  {%- set where = "messages[" ~ (loop.index0 + offset) ~ "]: role " ~ role|tojson -%}
  {%- if role not in ['user', 'assistant', 'model'] -%}
    {{ raise_exception(where ~ " is not supported; allowed roles: " ~ allowed) }}
  {%- endif -%}
  {%- if (role == 'user') != (loop.index0 % 2 == 0) -%}
    {{ raise_exception(where ~ " breaks the turn order; "
                       ~ "roles must alternate user/model(assistant), starting with user") }}
  {%- endif -%}
  {{ '<start_of_turn>' ~ ('user' if role == 'user' else 'model') ~ '\\n' }}
  {%- if loop.first %}{{ system_prefix }}{% endif -%}
  {{ message['content'] | trim }}<end_of_turn>{{ '\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{ '<start_of_turn>model\\n' }}
{%- endif -%}
"""

# Pieces that mark the end of a model turn in the template formats we know; a generation stops on
# them as on EOS.
END_OF_TURN_PIECES = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")


def end_of_turn_ids(piece_to_id: Callable[[str], int | None]) -> frozenset[int]:
    """Ids of the `END_OF_TURN_PIECES` this vocabulary has."""
    ids = (piece_to_id(piece) for piece in END_OF_TURN_PIECES)
    return frozenset(i for i in ids if i is not None)


def default_chat_template(piece_to_id: Callable[[str], int | None]) -> str:
    """The built-in template for a vocabulary whose checkpoint has none, or "" when none fits."""
    if piece_to_id("<start_of_turn>") is not None and piece_to_id("<end_of_turn>") is not None:
        return GEMMA_CHAT_TEMPLATE
    return ""


def render_chat_template(
    template: str,
    messages: Sequence[dict],
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """`template` rendered for `messages` (a list of {"role": ..., "content": ...} dicts)."""
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"messages[{index}]={message!r}: expected a dict with a 'role' key")
    return _compile(template).render(
        messages=[dict(m) for m in messages],
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
    )


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # Templates are fixed per model, so compiling once per distinct string is enough.
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(template)


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own `tojson` HTML-escapes `<`, `>` and `&`, which would corrupt prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)
