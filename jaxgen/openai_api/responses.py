"""Engine outputs -> OpenAI's response bodies and stream chunks, exactly in OpenAI's wire
format (objects, SSE chunks, usage, logprobs shapes). Shared by the HTTP app and batch jobs;
knows no transport.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

from jaxgen.openai_api.requests import Generation, OpenAIError
from jaxgen.request_stream import Completion, RequestOutput

FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


def failure(out: RequestOutput | Completion) -> OpenAIError | None:
    """The error a request that ended without a result answers with: 500 when the engine failed
    it, 503 when the engine was lost under it (retryable), 429 when it was shed under
    overload; None for every other end."""
    outcome = out.outcome
    if outcome == "error":
        return OpenAIError(500, f"the engine failed this request: {out.detail}")
    if outcome == "unavailable":
        return OpenAIError(503, out.detail, code="engine_unavailable")
    if outcome == "shed":
        return OpenAIError(429, out.detail, code="overloaded")
    return None


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
            if (error := failure(c)) is not None:
                raise error
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
        if (error := failure(out)) is not None:
            raise error
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

