"""OpenAI requests -> what the engine runs (`Generation`: prompts and per-choice
`SamplingParams`), and engine outputs -> OpenAI's response bodies and stream chunks, exactly in
OpenAI's wire format. Shared by the HTTP app and batch jobs; knows no transport.

Every user mistake raises `OpenAIError` (status 400 unless said otherwise) whose message names
the field, the value and the limit, as gRPC's INVALID_ARGUMENT messages do.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Sequence

from pydantic import ValidationError

from jaxgen.engine_api import EngineInfo
from jaxgen.openai_api import schemas as s
from jaxgen.request_stream import Completion, RequestOutput
from jaxgen.sampling_params import SamplingParams

FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


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


def invalid(e: ValidationError) -> OpenAIError:
    """The first validation error as one line: `field=value: what is wrong`."""
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "list[", "str", "int", "bool", "dict[", "float", "constrained")))
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


# -- responses ----------------------------------------------------------------------------------

class Responder:
    """Builds one request's response body, or its stream chunks, from engine outputs."""

    def __init__(self, gen: Generation, model: str, tokenizer, request_id: str | None = None):
        self.gen, self.model, self.tokenizer = gen, model, tokenizer
        prefix = "cmpl" if gen.kind == "completion" else "chatcmpl"
        self.id = request_id or f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "text_completion" if gen.kind == "completion" else "chat.completion"
        self._offsets = [0] * len(gen.choices)  # text offset of each choice (completions logprobs)

    # -- pieces --
    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _logprobs(self, index: int, logprobs) -> dict | None:
        if self.gen.top_logprobs is None or logprobs is None:
            return None
        if self.gen.kind == "chat":
            def entry(t, lp):
                text = self._token(t)
                return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
            return {"content": [dict(entry(lp.token_id, lp.logprob),
                                     top_logprobs=[entry(t, p) for t, p in lp.top])
                                for lp in logprobs]}
        tokens = [self._token(lp.token_id) for lp in logprobs]
        offsets = []
        for text in tokens:
            offsets.append(self._offsets[index])
            self._offsets[index] += len(text)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{self._token(t): p for t, p in lp.top} for lp in logprobs],
                "text_offset": offsets}

    def usage(self, usages: Sequence) -> dict:
        """`usages`: each choice's engine `Usage` (None for a choice that ended without one)."""
        n = self.gen.n
        prompt = sum(len(p) for p in self.gen.prompts)
        completion = sum(u.completion_tokens for u in usages if u is not None)
        cached = sum(usages[p * n].cached_prompt_tokens for p in range(len(self.gen.prompts))
                     if usages[p * n] is not None)
        drafted = sum(u.draft_tokens for u in usages if u is not None)
        accepted = sum(u.accepted_draft_tokens for u in usages if u is not None)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion,
                 "prompt_tokens_details": {"cached_tokens": cached}}
        if drafted:  # speculative decoding, in OpenAI's fields for predicted outputs
            usage["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                                  "rejected_prediction_tokens": drafted - accepted}
        return usage

    # -- whole response --
    def body(self, completions: Sequence[Completion]) -> dict:
        """The non-streamed response of the request (every choice finished)."""
        choices = []
        for choice, c in zip(self.gen.choices, completions):
            if c.finish_reason == "error":
                raise _engine_failed(c.outcome, c.detail)
            lp = self._logprobs(choice.index, c.logprobs)
            if self.gen.kind == "chat":
                choices.append({"index": choice.index, "message": {"role": "assistant",
                                                                   "content": c.text},
                                "logprobs": lp, "finish_reason": FINISH.get(c.finish_reason)})
            else:
                echo = self.gen.echo[choice.prompt_index] if self.gen.echo else ""
                choices.append({"index": choice.index, "text": echo + c.text, "logprobs": lp,
                                "finish_reason": FINISH.get(c.finish_reason)})
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage([c.usage for c in completions])}

    # -- stream --
    def _chunk(self, choices: list, usage=False) -> dict:
        chunk = {"id": self.id, "object": self.object + ("" if self.gen.kind == "completion" else ".chunk"),
                 "created": self.created, "model": self.model, "choices": choices}
        if self.gen.include_usage:
            chunk["usage"] = usage if usage is not False else None
        return chunk

    def first_chunks(self) -> list[dict]:
        """Chat: the role of each choice, before any text; completions with echo: the prompt."""
        if self.gen.kind == "chat":
            return [self._chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}])
                    for c in self.gen.choices]
        if self.gen.echo:
            return [self._chunk([{"index": c.index, "text": self.gen.echo[c.prompt_index],
                                  "logprobs": None, "finish_reason": None}])
                    for c in self.gen.choices]
        return []

    def chunk(self, index: int, out: RequestOutput) -> dict | None:
        """The chunk of one engine output of choice `index` (None when it carries nothing)."""
        if out.finish_reason == "error":
            raise _engine_failed(out.outcome, out.detail)
        finish = FINISH.get(out.finish_reason) if out.finished else None
        if not out.text and not out.token_ids and finish is None:
            return None
        lp = self._logprobs(index, out.logprobs)
        if self.gen.kind == "chat":
            delta = {"content": out.text} if out.text or not finish else {}
            return self._chunk([{"index": index, "delta": delta, "logprobs": lp,
                                 "finish_reason": finish}])
        return self._chunk([{"index": index, "text": out.text, "logprobs": lp,
                             "finish_reason": finish}])

    def usage_chunk(self, usages: Sequence) -> dict | None:
        return self._chunk([], usage=self.usage(usages)) if self.gen.include_usage else None


def _engine_failed(outcome: str, detail: str) -> OpenAIError:
    """503 (retryable) when the engine was lost under the request, else 500."""
    if outcome == "unavailable":
        return OpenAIError(503, f"the engine can no longer serve this request: {detail}")
    return OpenAIError(500, f"the engine failed this request: {detail}")
