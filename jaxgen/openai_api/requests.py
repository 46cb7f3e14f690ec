"""OpenAI requests -> what the engine runs (`Generation`: prompts and per-choice
`SamplingParams`). Shared by the HTTP app and batch jobs; knows no transport (responses:
jaxgen.openai_api.responses).

Every user mistake raises `OpenAIError` (status 400 unless said otherwise) whose message names
the field, the value and the limit, as gRPC's INVALID_ARGUMENT messages do.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from pydantic import ValidationError

from jaxgen.engine_api import EngineInfo
from jaxgen.openai_api import schemas as s
from jaxgen.sampling_params import MAX_STOP_STRINGS, SamplingParams

class OpenAIError(Exception):
    """An error as OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


def _shown(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}…({len(text)} chars)"


# How pydantic names the member of a union that an error is about, in an error's location.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|(list|dict)\[.*\]|[A-Z]\w*)$")
# What each union field accepts, said once for all its members' errors.
_UNION_FIELDS = {
    "prompt": f"a string, a list of strings, a list of token ids or a list of such lists "
              f"(1..{s.MAX_PROMPTS} prompts)",
    "stop": f"a string or a list of at most {MAX_STOP_STRINGS} strings",
    "content": "a string or a list of text parts ({\"type\": \"text\", \"text\": ...})",
}


def invalid(e: ValidationError) -> OpenAIError:
    """The first validation error as one line: `field=value: what is wrong`."""
    err = e.errors(include_url=False)[0]
    parts = [str(p) for p in err["loc"]]
    member = next((i for i, p in enumerate(parts) if _UNION_MEMBER.match(p)), None)
    if member is not None and parts[member - 1] in _UNION_FIELDS:  # one message for the union
        loc = ".".join(parts[:member])
        return OpenAIError(400, f"{loc}={_shown(err.get('input'))}: must be "
                                f"{_UNION_FIELDS[parts[member - 1]]}", loc)
    loc = ".".join(p for p in parts if not _UNION_MEMBER.match(p))
    if err["type"] == "missing":
        return OpenAIError(400, f"{loc}: field required", loc or None)
    return OpenAIError(400, f"{loc}={_shown(err.get('input'))}: {err['msg']}", loc or None)


def parse(model: type[s._Body], body) -> s._Body:
    if not isinstance(body, dict):
        raise OpenAIError(400, f"body={_shown(body)}: expected a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise invalid(e) from None


@dataclasses.dataclass(frozen=True)
class Choice:
    index: int  # OpenAI's choice index: prompt_index * n + i
    prompt_index: int
    params: SamplingParams


@dataclasses.dataclass(frozen=True)
class Generation:
    """What one OpenAI request asks of the engine."""

    kind: str  # "completion" or "chat"
    prompts: tuple[tuple[int, ...], ...]
    n: int
    choices: tuple[Choice, ...]  # grouped by prompt, n each
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # logprobs asked for (with so many alternatives), else None
    echo: tuple[str, ...] | None = None  # completions with echo: each prompt's text


def check_model(name: str | None, served: str) -> None:
    if name is not None and name != served:
        raise OpenAIError(404, f"model={_shown(name)}: no such model; this server serves "
                               f"{served!r}", "model", "model_not_found")


def _refuse_unsupported(req) -> None:
    if req.best_of is not None and req.best_of > req.n:
        raise OpenAIError(400, f"best_of={req.best_of} > n={req.n}: not supported yet", "best_of")
    if isinstance(req, s.CompletionRequest):
        if req.suffix:
            raise OpenAIError(400, "suffix: not supported yet", "suffix")
        if req.echo and req.logprobs is not None:
            raise OpenAIError(400, "echo with logprobs: prompt logprobs are not supported yet",
                              "echo")
    else:
        if req.response_format is not None and req.response_format.type != "text":
            raise OpenAIError(400, f"response_format.type={req.response_format.type!r}: only "
                                   f"'text' is supported yet", "response_format")
        if req.tools or req.tool_choice not in (None, "none"):
            raise OpenAIError(400, "tools / tool_choice: tool calling is not supported yet",
                              "tools")


def _logit_bias(req, vocab: int) -> tuple[tuple[int, float], ...]:
    out = []
    for key, bias in (req.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise OpenAIError(400, f"logit_bias key {_shown(key)}: must be a token id",
                              "logit_bias") from None
        if not 0 <= token < vocab:
            raise OpenAIError(400, f"logit_bias token id {token}: outside the vocabulary "
                                   f"[0, {vocab})", "logit_bias")
        out.append((token, float(bias)))
    return tuple(out)


def _params(req, max_tokens: int, logprobs: int | None, vocab: int, seed_offset: int) -> SamplingParams:
    seed = None if req.seed is None else req.seed + seed_offset
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_k=max(req.top_k or 0, 0), top_p=1.0 if req.top_p is None else req.top_p,
            min_p=req.min_p or 0.0, presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            seed=seed, stop=stop, stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos, logprobs=logprobs,
            priority=req.jaxgen.priority if req.jaxgen else 0,
            speculative=req.jaxgen.speculative if req.jaxgen else True,
            logit_bias=_logit_bias(req, vocab))
    except ValueError as e:
        raise OpenAIError(400, str(e)) from None


def _max_tokens(asked: int | None, prompt_len: int, info: EngineInfo) -> int:
    room = info.max_model_len - prompt_len
    if asked is None:
        if room < 1:
            raise OpenAIError(400, f"prompt of {prompt_len} tokens: leaves no room for a "
                                   f"completion within max_model_len={info.max_model_len}",
                              "messages")
        return room
    if asked > room:
        raise OpenAIError(400, f"max_tokens={asked}: prompt of {prompt_len} tokens + {asked} "
                               f"exceeds max_model_len={info.max_model_len}", "max_tokens")
    return asked


def _generation(kind, req, prompts, max_tokens, logprobs, info, echo=None) -> Generation:
    if req.seed is not None and req.seed + req.n > 2**32:
        raise OpenAIError(400, f"seed={req.seed}: seed + n must stay below 2**32", "seed")
    choices = []
    for p, ids in enumerate(prompts):
        if not ids:
            raise OpenAIError(400, f"prompt {p}: empty", "prompt")
        limit = _max_tokens(max_tokens, len(ids), info)
        choices += [Choice(p * req.n + i, p, _params(req, limit, logprobs, info.vocab_size, i))
                    for i in range(req.n)]
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Generation(kind, tuple(tuple(p) for p in prompts), req.n, tuple(choices), req.stream,
                      include_usage, logprobs, echo)


def completion_generation(req: s.CompletionRequest, tokenizer, info: EngineInfo) -> Generation:
    """Tokenizes the prompts (the caller may run this off its event loop)."""
    check_model(req.model, info.name)
    _refuse_unsupported(req)
    prompt = req.prompt
    if isinstance(prompt, str):
        texts, prompts = [prompt], [tokenizer.encode(prompt)]
    elif isinstance(prompt[0], str):
        texts, prompts = list(prompt), [tokenizer.encode(t) for t in prompt]
    elif isinstance(prompt[0], int):
        prompts = [list(prompt)]
        texts = None
    else:
        prompts, texts = [list(p) for p in prompt], None
    for p, ids in enumerate(prompts):
        bad = next((t for t in ids if not 0 <= t < info.vocab_size), None)
        if bad is not None:
            raise OpenAIError(400, f"prompt {p}: token id {bad} outside the vocabulary "
                                   f"[0, {info.vocab_size})", "prompt")
    echo = None
    if req.echo:
        echo = tuple(texts) if texts is not None else tuple(tokenizer.decode(p) for p in prompts)
    return _generation("completion", req, prompts, req.max_tokens, req.logprobs, info, echo)


def chat_messages(messages: Sequence[s.ChatMessage]) -> list[dict]:
    out = []
    for m in messages:
        content = m.content if isinstance(m.content, str) or m.content is None else \
            "".join(part.text for part in m.content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    return out


def chat_generation(req: s.ChatCompletionRequest, tokenizer, info: EngineInfo) -> Generation:
    check_model(req.model, info.name)
    _refuse_unsupported(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise OpenAIError(400, f"top_logprobs={req.top_logprobs}: needs logprobs=true", "top_logprobs")
    try:
        ids = tokenizer.encode_chat(chat_messages(req.messages), req.add_generation_prompt)
    except ValueError as e:  # no chat template, or the template refused the conversation
        raise OpenAIError(400, f"messages: {e}", "messages") from None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return _generation("chat", req, [ids], max_tokens, logprobs, info)


# The generation endpoints: URL -> (request schema, its mapping to a Generation). The HTTP app
# serves them; batch lines name them in `url`.
ENDPOINTS = {"/v1/completions": (s.CompletionRequest, completion_generation),
             "/v1/chat/completions": (s.ChatCompletionRequest, chat_generation)}
