"""Proto messages <-> engine requests and outputs.

`prompt_source` and `sampling_params` turn a `GenerateRequest` into what `Engine.add_request`
takes; every user mistake raises `InvalidRequest` naming the field, the value and the limit (the
limits `SamplingParams`, the scheduler and the engine already check are left to them: their
ValueErrors reach the client as they are). `response` turns a `RequestOutput` into a
`GenerateResponse`. Knows the proto and the engine's plain data types; does not know grpc,
asyncio or the device.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

from jaxgen.request_stream import RequestOutput
from jaxgen.sampling_params import SamplingParams
from jaxgen.v1 import generation_pb2 as pb

CHAT_ROLES = ("system", "user", "assistant")
MAX_N = 16  # choices per request
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_OPTIONAL_SAMPLING = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                      "presence_penalty", "frequency_penalty", "seed", "logprobs", "speculative")
FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
                  "abort": pb.FINISH_REASON_ABORT}


class InvalidRequest(ValueError):
    """A request the server refuses (INVALID_ARGUMENT); the message names the field."""


def shown(value, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters so an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}…({len(text)} chars)"


def request_id(given: str) -> str | None:
    """The client's id, checked; None when it left the field empty (the server makes one)."""
    if not given:
        return None
    if not REQUEST_ID.fullmatch(given):
        raise InvalidRequest(f"request_id={shown(given)}: must be 1..128 characters from "
                             f"[A-Za-z0-9._:-]")
    return given


def chat_messages(messages: Sequence[pb.ChatMessage], field: str = "messages") -> list[dict]:
    if not messages:
        raise InvalidRequest(f"{field}=[]: at least one message is required")
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise InvalidRequest(f"{field}[{i}].role={shown(m.role)}: must be one of "
                                 f"{', '.join(CHAT_ROLES)}")
    return [{"role": m.role, "content": m.content} for m in messages]


def prompt_source(request: pb.GenerateRequest, tokenizer) -> Callable[[], list[int]]:
    """A function computing the prompt's token ids (text is tokenized, chat messages rendered
    with the model's chat template): cheap checks run now, the tokenizer's work when it is
    called, so the caller can run it off the event loop."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidRequest("input: one of text, token_ids, messages is required")
    if kind == "text":
        if not request.text:
            raise InvalidRequest("text='': the prompt is empty")
        return lambda: tokenizer.encode(request.text)
    if kind == "token_ids":
        ids = list(request.token_ids.ids)
        if not ids:
            raise InvalidRequest("token_ids.ids=[]: the prompt is empty")
        return lambda: ids
    messages = chat_messages(request.messages.messages, "messages.messages")
    return lambda: tokenizer.encode_chat(messages)


def sampling_params(msg: pb.SamplingParams, priority: int, prompt_len: int,
                    max_context: int) -> SamplingParams:
    """`SamplingParams` from the proto: unset fields take the engine defaults, except max_tokens,
    which defaults to the rest of the context."""
    fields = {name: getattr(msg, name) for name in _OPTIONAL_SAMPLING if msg.HasField(name)}
    if "max_tokens" not in fields:
        room = max_context - prompt_len
        if room < 1:
            raise InvalidRequest(f"prompt of {prompt_len} tokens: leaves no room for max_tokens "
                                 f"within max_context_length={max_context}")
        fields["max_tokens"] = room
    try:
        return SamplingParams(stop=tuple(msg.stop), stop_token_ids=tuple(msg.stop_token_ids),
                              ignore_eos=msg.ignore_eos, priority=priority,
                              logit_bias=tuple(sorted(msg.logit_bias.items())), **fields)
    except ValueError as e:
        raise InvalidRequest(f"sampling.{e}") from None


def choices(request: pb.GenerateRequest, params: SamplingParams) -> list[SamplingParams]:
    """The sampling parameters of each of the request's `n` choices (choice i: seed + i)."""
    n = max(request.n, 1)
    if not 0 <= request.n <= MAX_N:
        raise InvalidRequest(f"n={request.n}: must be in [0, {MAX_N}]")
    if params.seed is not None and params.seed + n > 2**32:
        raise InvalidRequest(f"sampling.seed={params.seed}: seed + n must stay below 2**32")
    return [params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
            for i in range(n)]


def _usage(usage) -> pb.Usage:
    out = pb.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                   cached_prompt_tokens=usage.cached_prompt_tokens,
                   num_preemptions=usage.num_preemptions, draft_tokens=usage.draft_tokens,
                   accepted_draft_tokens=usage.accepted_draft_tokens)
    if usage.queue_time is not None:
        out.queue_time_s = usage.queue_time
    if usage.time_to_first_token is not None:
        out.time_to_first_token_s = usage.time_to_first_token
    return out


def response(out: RequestOutput, request_id: str | None = None, index: int = 0) -> pb.GenerateResponse:
    """The proto of one engine output of choice `index` (finish reasons other than "error",
    which the servicer turns into a status); `request_id`: the call's (default: the output's)."""
    msg = pb.GenerateResponse(request_id=request_id or out.request_id, text=out.text,
                              token_ids=out.token_ids, index=index)
    for lp in out.logprobs or ():
        msg.logprobs.add(token_id=lp.token_id, logprob=lp.logprob,
                         top=[pb.TopLogprob(token_id=t, logprob=p) for t, p in lp.top])
    if out.finish_reason is not None:
        msg.finish_reason = FINISH_REASONS[out.finish_reason]
        msg.finish_detail = out.detail
        if out.usage is not None:
            msg.usage.CopyFrom(_usage(out.usage))
    return msg
