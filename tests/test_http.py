"""The OpenAI-compatible HTTP API end to end, through the official `openai` client (sync and
async) against the session's real `jaxgen serve` processes (both engine modes, the same engine
as gRPC): greedy output equals gRPC and the offline engine; streaming equals non-streaming; chat
renders gRPC chat's prompt; `n` choices equal separate seeded requests; logit_bias; fuzzed
bodies get 200 or 400; disconnects free slots and pages; errors are OpenAI's error object."""

from __future__ import annotations

import asyncio
import json
import os

import httpx2 as httpx  # what the openai client itself uses
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxgen.v1 import generation_pb2 as pb
from tests.served import API_KEY, CONCURRENT, FREED_WITHIN_S, STREAMED, as_request
from tests.server_process import MODEL, SMALL_NAME

MODEL_NAME = SMALL_NAME  # the servers' --served-model-name
# The session's server with the engine in its own process (the default mode); the HTTP app is
# the same over both modes' engine surface, which tests/test_server.py covers in each.
pytestmark = pytest.mark.parametrize("served", ["process"], indirect=True)


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    from jaxgen.checkpoints import registry
    from jaxgen.tokenizer import load_tokenizer

    return load_tokenizer(os.path.join(registry.cache_dir(cache_dir), "models", MODEL, "tokenizer"))


def client(served, key=API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.http + "/v1", api_key=key, max_retries=0, timeout=120)


def raw(served, method, path, body=None, key=API_KEY, timeout=120) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = None if body is None else body if isinstance(body, str) else json.dumps(body)
    return httpx.request(method, served.http + path, headers=headers, timeout=timeout,
                         content=content)


def test_greedy_completions_equal_grpc_and_the_offline_engine(served, tokenizer):
    c = client(served)
    for spec, want in zip(STREAMED, served.offline.result()):
        grpc_text = "".join(r.text for r in served.stub.Generate(as_request(spec)))
        common = dict(model=MODEL_NAME, max_tokens=spec["max_tokens"], temperature=0,
                      stop=spec.get("stop"))
        if "messages" in spec:
            r = c.chat.completions.create(messages=spec["messages"], logprobs=True, **common)
            text, tokens = r.choices[0].message.content, [t.token for t in r.choices[0].logprobs.content]
        else:
            r = c.completions.create(prompt=spec["text"], logprobs=0, **common)
            text, tokens = r.choices[0].text, r.choices[0].logprobs.tokens
        assert text == want["text"] == grpc_text
        # Token for token: the offline ids, each as the API spells it (its decoded text).
        assert tokens == [tokenizer.decode([t]) for t in want["token_ids"]]
        assert r.usage.prompt_tokens == want["prompt_tokens"]  # chat: the same rendered prompt
        assert r.usage.completion_tokens == len(want["token_ids"])
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.choices[0].finish_reason == want["finish_reason"]
        assert r.object == ("chat.completion" if "messages" in spec else "text_completion")


def test_streamed_text_equals_non_streamed_and_ends_with_usage(served):
    c = client(served)
    spec = STREAMED[1]
    whole = c.chat.completions.create(model=MODEL_NAME, messages=spec["messages"],
                                      max_tokens=spec["max_tokens"], temperature=0)
    chunks = list(c.chat.completions.create(model=MODEL_NAME, messages=spec["messages"],
                                            max_tokens=spec["max_tokens"], temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
        whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    assert [ch.choices[0].finish_reason for ch in chunks[-2:-1]] == [whole.choices[0].finish_reason]
    text = STREAMED[0]
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL_NAME, prompt=text["text"], max_tokens=text["max_tokens"], temperature=0,
        stream=True))
    assert streamed == served.offline.result()[0]["text"]


def test_128_concurrent_sse_streams_with_the_async_client(served):
    want = served.offline.result()[len(STREAMED):]

    async def one(c, spec):
        common = dict(model=MODEL_NAME, max_tokens=spec["max_tokens"], temperature=0, stream=True)
        if "messages" in spec:
            stream = await c.chat.completions.create(messages=spec["messages"], **common)
            return "".join([ch.choices[0].delta.content or "" async for ch in stream])
        stream = await c.completions.create(prompt=spec["text"], **common)
        return "".join([ch.choices[0].text async for ch in stream])

    async def run():
        async with openai.AsyncOpenAI(base_url=served.http + "/v1", api_key=API_KEY,
                                      max_retries=0, timeout=300) as c:
            return await asyncio.gather(*(one(c, spec) for spec in CONCURRENT + CONCURRENT))

    texts = asyncio.run(run())
    assert texts == [w["text"] for w in want] * 2
    assert served.wait_idle() < FREED_WITHIN_S


def test_n_choices_with_a_seed_equal_single_requests_with_seeds_s_s1_s2(served):
    c = client(served)
    common = dict(model=MODEL_NAME, prompt="The ocean at night is dark and " * 8, max_tokens=6,
                  temperature=1.0, top_p=0.9)
    hits = served.stats().prefix_cache_hit_tokens
    many = c.completions.create(n=3, seed=11, **common)
    # The prompt was prefilled once: the other two choices found its full pages in the cache.
    full_pages = (many.usage.prompt_tokens - 1) // 16 * 16  # the last token is always fed
    assert full_pages >= 32 and served.stats().prefix_cache_hit_tokens - hits == 2 * full_pages
    singles = [c.completions.create(seed=11 + i, **common).choices[0].text for i in range(3)]
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    assert [ch.text for ch in many.choices] == singles
    assert many.usage.completion_tokens == 18 and many.usage.prompt_tokens == \
        c.completions.create(seed=1, **dict(common, max_tokens=1)).usage.prompt_tokens
    grpc_chunks = list(served.stub.Generate(pb.GenerateRequest(
        text=common["prompt"], n=3, sampling=pb.SamplingParams(max_tokens=6, temperature=1.0,
                                                                top_p=0.9, seed=11))))
    by_index = {i: "".join(ch.text for ch in grpc_chunks if ch.index == i) for i in range(3)}
    assert list(by_index.values()) == singles


def test_logit_bias_pushes_away_the_greedy_token_and_forces_another(served, tokenizer):
    c = client(served)
    prompt, want = STREAMED[0]["text"], served.offline.result()[0]["token_ids"]
    first = want[0]
    away = c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1, temperature=0,
                                logit_bias={str(first): -100})
    assert away.choices[0].text != tokenizer.decode([first])
    forced_id = tokenizer.encode(" banana", add_bos=False)[-1]
    forced = c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1, temperature=0,
                                  logit_bias={str(forced_id): 100})
    assert forced.choices[0].text == tokenizer.decode([forced_id])
    err = raw(served, "POST", "/v1/completions", {"prompt": "x", "logit_bias": {"999999": 1}})
    assert err.status_code == 400 and "999999" in err.json()["error"]["message"]
    assert "49152" in err.json()["error"]["message"]  # the vocabulary size


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": "x", "temperature": -1}, 400, "temperature=-1"),
    ({"prompt": "x", "max_tokens": 100000}, 400, "max_tokens=100000"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model='gpt-4'"),
    ({"prompt": "x", "suffix": "y"}, 400, "suffix: not supported yet"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of=3 > n=1: not supported yet"),
    ({"prompt": []}, 400, "prompt"),
    ({"max_tokens": 3}, 400, "prompt: field required"),
    ("{not json", 400, "not valid JSON"),
])
def test_bad_completions_are_openai_errors_naming_the_field(served, body, status, message):
    r = raw(served, "POST", "/v1/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text


@pytest.mark.parametrize("extra, message", [
    ({"response_format": {"type": "json_object"}}, "response_format.type='json_object'"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool calling is not supported"),
    ({"top_logprobs": 2}, "top_logprobs=2: needs logprobs=true"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role='tool'"),
])
def test_unsupported_chat_fields_are_refused_with_a_message(served, extra, message):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2} | extra
    r = raw(served, "POST", "/v1/chat/completions", body)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_auth_models_version_health_metrics_tokenize(served):
    assert raw(served, "GET", "/health", key=None).status_code == 200  # open
    assert raw(served, "GET", "/version", key=None).json()["version"]
    for key, what in [(None, "missing"), ("wrong", "invalid")]:
        r = raw(served, "POST", "/v1/completions", {"prompt": "x"}, key=key)
        assert r.status_code == 401 and what in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        client(served, key="wrong").models.list()
    models = client(served).models.list().data
    assert [m.id for m in models] == [MODEL_NAME] and models[0].model_extra["max_model_len"] == 512
    metrics = raw(served, "GET", "/metrics").text
    assert "jaxgen_requests_total" in metrics and "jaxgen_kv_pages" in metrics
    ids = raw(served, "POST", "/tokenize", {"prompt": "Hello, world!"}).json()["tokens"]
    assert ids == list(served.stub.Tokenize(pb.TokenizeRequest(text="Hello, world!")).token_ids)
    chat = raw(served, "POST", "/tokenize", {"messages": STREAMED[1]["messages"]}).json()
    assert chat["count"] == served.offline.result()[1]["prompt_tokens"]
    assert raw(served, "POST", "/detokenize", {"tokens": ids}).json()["prompt"] == "Hello, world!"


def test_a_client_that_disconnects_frees_its_slot_and_pages(served):
    body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", served.http + "/v1/completions", json=body | {"stream": True},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
        assert served.wait_running(1).num_running == 1
    assert served.wait_idle() < FREED_WITHIN_S  # the stream was closed: aborted
    with pytest.raises(httpx.ReadTimeout):  # non-streamed: the client gives up waiting
        raw(served, "POST", "/v1/completions", body, timeout=2)
    assert served.wait_idle() < FREED_WITHIN_S


# Fuzzing: a valid body with one to three fields replaced by values of any JSON type, so most
# bodies are refused (400) and the rest generate a couple of tokens (200).
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) |
                    st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.text(max_size=6), inner, max_size=3), max_leaves=6)
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p",
          "n", "seed", "stop", "stop_token_ids", "logit_bias", "logprobs", "top_logprobs", "echo",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "stream", "user",
          "ignore_eos", "best_of", "response_format", "stream_options", "max_completion_tokens"]


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(chat=st.booleans(), changes=st.dictionaries(st.sampled_from(FIELDS), JSON, min_size=1,
                                                   max_size=3))
def test_fuzzed_bodies_get_200_or_400_with_a_message(served, chat, changes):
    base = ({"messages": [{"role": "user", "content": "Hi"}]} if chat else {"prompt": "Hi"})
    body = base | {"max_tokens": 2} | changes
    for key in ("max_tokens", "max_completion_tokens"):  # keep any valid run short
        if isinstance(body.get(key), int) and body[key] > 2:
            body[key] = 2
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 2
    if isinstance(body.get("n"), int) and body["n"] > 2:
        body["n"] = 2
    r = raw(served, "POST", "/v1/chat/completions" if chat else "/v1/completions", body)
    assert r.status_code in (200, 400, 404), (body, r.text)
    if r.status_code != 200:
        assert r.json()["error"]["message"], body
    assert "Traceback" not in r.text


def test_after_fuzzing_the_server_is_serving_and_exact(served):
    assert raw(served, "GET", "/health", key=None).status_code == 200
    spec, want = STREAMED[0], served.offline.result()[0]
    r = client(served).completions.create(model=MODEL_NAME, prompt=spec["text"],
                                          max_tokens=spec["max_tokens"], temperature=0)
    assert r.choices[0].text == want["text"]
    assert served.wait_idle() < FREED_WITHIN_S and served.stats().compilations_after_warmup == 0
