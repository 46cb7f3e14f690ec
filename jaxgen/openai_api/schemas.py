"""Pydantic v2 models of the OpenAI request bodies jaxgen accepts (`/v1/completions`,
`/v1/chat/completions`, `/tokenize`, `/detokenize`), with OpenAI's field names and ranges.

Fields OpenAI defines that jaxgen does not support yet are declared so they can be refused with
a message saying so (`unsupported`), not silently ignored; unknown extra fields are accepted and
ignored, as vLLM's server does. Knows no transport and no engine.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from jaxgen.sampling_params import (MAX_CACHE_SALT_LEN, MAX_LOGIT_BIAS, MAX_LOGPROBS,
                                    MAX_STOP_STRINGS)

MAX_N = 16  # choices per request
MAX_PROMPTS = 64  # prompts per completions request


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class StreamOptions(_Body):
    include_usage: StrictBool = False


class JaxgenOptions(_Body):
    """The `jaxgen` extension object (fields jaxgen adds to OpenAI's)."""

    priority: StrictInt = Field(0, ge=-2**31, lt=2**31)  # admission order: lower first
    speculative: StrictBool = True  # false: no speculative decoding for this request


class SamplingFields(_Body):
    """What completions and chat requests share."""

    model: StrictStr | None = None  # must be the served model name when given
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    best_of: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=-1)  # 0 or -1: off (vLLM's spelling)
    min_p: float | None = Field(None, ge=0, lt=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: StrictInt | None = Field(None, ge=0, lt=2**32)
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool = False
    # Token id (as a JSON object key) -> bias added to its logit.
    logit_bias: Annotated[dict[str, float], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    user: StrictStr | None = None  # accepted, ignored
    # Prefix-cache isolation (vLLM's field): pages are shared only among requests of the same
    # salt, within the server's --prefix-cache-scope.
    cache_salt: StrictStr | None = Field(None, max_length=MAX_CACHE_SALT_LEN)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    jaxgen: JaxgenOptions | None = None


class CompletionRequest(SamplingFields):
    prompt: (StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_PROMPTS)]
             | Annotated[list[StrictInt], Field(min_length=1)]
             | Annotated[list[Annotated[list[StrictInt], Field(min_length=1)]],
                         Field(min_length=1, max_length=MAX_PROMPTS)])
    max_tokens: StrictInt | None = Field(16, ge=1)  # OpenAI's default; null: the rest of the context
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: StrictStr | None = None  # refused (unsupported)


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None  # accepted, ignored


class ResponseFormat(_Body):
    type: StrictStr


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: StrictInt | None = Field(None, ge=1)  # deprecated by OpenAI in favour of:
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None  # only {"type": "text"}
    tools: list[Any] | None = None  # refused (unsupported)
    tool_choice: Any = None  # refused (unsupported)
    add_generation_prompt: StrictBool = True  # vLLM's extension


class TokenizeRequest(_Body):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(_Body):
    model: StrictStr | None = None
    tokens: list[StrictInt]
