"""The gRPC server end to end: a real `jaxgen serve` process on loopback (a small model cut from
SmolLM2-135M, API key required) against the offline engine's greedy output — streaming, 64
concurrent clients, cancellation / deadline / Abort freeing slot and pages, fuzzed requests,
validation messages, reflection-only clients, auth, tokenization and model info."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
    ProtoReflectionDescriptorDatabase
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxgen.v1 import generation_pb2 as pb
from jaxgen.v1 import generation_pb2_grpc as pb_grpc
from tests.served import (API_KEY, CONCURRENT, CONTEXT, DECODE_STEPS, FREED_WITHIN_S, LONG,
                          METADATA, SLOTS, STREAMED, VOCAB, as_request)

def test_stream_equals_offline_engine(served):
    want = served.offline.result()[:len(STREAMED)]
    for spec, expected in zip(STREAMED, want):
        chunks = list(served.stub.Generate(as_request(spec)))
        assert len(chunks) > 1  # really streamed, not one message at the end
        assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
        assert "".join(c.text for c in chunks) == expected["text"]
        assert [t for c in chunks for t in c.token_ids] == expected["token_ids"]
        last = chunks[-1]
        assert pb.FinishReason.Name(last.finish_reason) == f"FINISH_REASON_{expected['finish_reason'].upper()}"
        assert last.usage.prompt_tokens == expected["prompt_tokens"]
        assert last.usage.completion_tokens == len(expected["token_ids"])
        assert last.usage.HasField("time_to_first_token_s") and last.usage.HasField("queue_time_s")
        assert len({c.request_id for c in chunks}) == 1 and chunks[0].request_id
    # The small model's text means nothing; that both engines give the whole model's right
    # answer is tests/test_engine_surface.py's check.
    assert all(w["token_ids"] for w in want)


def test_64_concurrent_streaming_clients_equal_offline(served):
    want = served.offline.result()[len(STREAMED):]

    async def client(i, spec):
        async with grpc.aio.insecure_channel(served.target) as channel:
            stub = pb_grpc.GenerationStub(channel)
            call = stub.Generate(as_request(spec, request_id=f"concurrent-{i}"), metadata=METADATA)
            return [c async for c in call]

    async def all_clients():
        return await asyncio.gather(*(client(i, s) for i, s in enumerate(CONCURRENT)))

    threads = threading.active_count()
    results = asyncio.run(all_clients())
    for i, (chunks, expected) in enumerate(zip(results, want)):
        assert "".join(c.text for c in chunks) == expected["text"], i
        assert [t for c in chunks for t in c.token_ids] == expected["token_ids"], i
        assert chunks[-1].usage.completion_tokens == len(expected["token_ids"]), i
    assert threading.active_count() <= threads + 2  # the client side, for what it is worth
    assert served.wait_idle() < FREED_WITHIN_S


def test_cancel_mid_stream_frees_slot_and_pages(served):
    call = served.stub.Generate(pb.GenerateRequest(text="Once upon a time",
                                                   sampling=pb.SamplingParams(**LONG)))
    chunks = iter(call)
    next(chunks), next(chunks)
    busy = served.wait_running(1)
    assert busy.num_pages_used > 0 and busy.num_free_slots == SLOTS - 1 and busy.active_streams == 1
    call.cancel()
    assert served.wait_idle() < FREED_WITHIN_S
    assert served.stats().active_streams == 0


def test_expired_deadline_frees_slot_and_pages(served):
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        for _ in served.stub.Generate(pb.GenerateRequest(text="Once upon a time",
                                                         sampling=pb.SamplingParams(**LONG)),
                                      timeout=1.5):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 1.5 + FREED_WITHIN_S
    assert served.wait_idle() < FREED_WITHIN_S


def test_abort_by_id_frees_slot_and_pages_and_ends_the_stream(served):
    call = served.stub.Generate(pb.GenerateRequest(request_id="abort-me", text="Once upon a time",
                                                   sampling=pb.SamplingParams(**LONG)))
    chunks = iter(call)
    received = len(next(chunks).token_ids) + len(next(chunks).token_ids)
    assert served.stub.Abort(pb.AbortRequest(request_id="abort-me")).found
    rest = list(chunks)
    last = rest[-1]
    assert last.finish_reason == pb.FINISH_REASON_ABORT and last.finish_detail == "aborted"
    # Tokens after the Abort: at most the step in flight and the one it raced with.
    assert last.usage.completion_tokens <= received + 2 * DECODE_STEPS
    assert last.usage.completion_tokens == received + sum(len(c.token_ids) for c in rest)
    assert served.wait_idle() < FREED_WITHIN_S
    assert not served.stub.Abort(pb.AbortRequest(request_id="abort-me")).found
    assert not served.stub.Abort(pb.AbortRequest(request_id="never-seen")).found


def test_duplicate_request_id_in_flight_is_refused(served):
    first = served.stub.Generate(pb.GenerateRequest(request_id="dup", text="Hello",
                                                    sampling=pb.SamplingParams(**LONG)))
    next(iter(first))
    with pytest.raises(grpc.RpcError) as err:
        list(served.stub.Generate(pb.GenerateRequest(request_id="dup", text="Hi")))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and "dup" in err.value.details()
    first.cancel()
    served.wait_idle()
    # Once the engine has let go of it, the id can be used again: the server releases it when
    # the aborted request's final output reaches its event loop, which may come a moment after
    # the engine's counters show it idle (seen on a loaded box with the engine on a thread).
    deadline = time.monotonic() + FREED_WITHIN_S
    while True:
        try:
            again = list(served.stub.Generate(pb.GenerateRequest(
                request_id="dup", text="Hi", sampling=pb.SamplingParams(max_tokens=2, temperature=0))))
            break
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert again[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)


def _sampling(**kw):
    return pb.SamplingParams(**{"max_tokens": 4, **kw})


BAD_REQUESTS = [
    (pb.GenerateRequest(), "input: one of text, token_ids, messages is required"),
    (pb.GenerateRequest(text=""), "text='': the prompt is empty"),
    (pb.GenerateRequest(token_ids=pb.TokenIds()), "token_ids.ids=[]: the prompt is empty"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, VOCAB])),
     f"prompt token id {VOCAB}: outside the vocabulary [0, {VOCAB})"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[-1])), "prompt token id -1"),
    (pb.GenerateRequest(text="Hi", sampling=_sampling(max_tokens=600)),
     f"max_tokens=600 = 601: exceeds max_model_len={CONTEXT}"),
    (pb.GenerateRequest(text="Hi", sampling=_sampling(max_tokens=0)),
     "sampling.max_tokens=0: must be an integer >= 1"),
    (pb.GenerateRequest(text="Hi", sampling=_sampling(temperature=-0.5)),
     "sampling.temperature=-0.5: must be a finite number >= 0"),
    (pb.GenerateRequest(text="Hi", sampling=_sampling(temperature=float("nan"))),
     "sampling.temperature=nan"),
    (pb.GenerateRequest(text="Hi", sampling=_sampling(top_p=0.0)), "sampling.top_p=0.0: must be in (0, 1]"),
    (pb.GenerateRequest(text="Hi", sampling=_sampling(top_p=1.5)), "sampling.top_p=1.5"),
    (pb.GenerateRequest(text="Hi", sampling=_sampling(top_k=-1)), "sampling.top_k=-1: must be >= 0"),
    (pb.GenerateRequest(text="Hi", sampling=_sampling(stop=["x"] * 17)), "at most 16 stop strings"),
    (pb.GenerateRequest(text="Hi", sampling=_sampling(stop=["x" * 257])),
     "each stop string must have 1..256 characters"),
    (pb.GenerateRequest(text="Hi", sampling=_sampling(stop_token_ids=[VOCAB + 3])),
     f"stop_token_ids[0]={VOCAB + 3}: outside the vocabulary [0, {VOCAB})"),
    (pb.GenerateRequest(text="Hi", sampling=_sampling(logprobs=21)), "sampling.logprobs=21: must be in [0, 20]"),
    (pb.GenerateRequest(text="Hi", sampling=_sampling(seed=-3)), "sampling.seed=-3"),
    (pb.GenerateRequest(messages=pb.ChatMessages()), "messages.messages=[]: at least one message"),
    (pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="wizard", content="x")])),
     "messages.messages[0].role='wizard': must be one of system, user, assistant"),
    (pb.GenerateRequest(text="Hi", request_id="has space"), "request_id='has space': must be 1..128"),
    (pb.GenerateRequest(text="Hi " * 600), f"leaves no room for max_tokens within max_context_length={CONTEXT}"),
]


@pytest.mark.parametrize("request_, message", BAD_REQUESTS, ids=[m[:40] for _, m in BAD_REQUESTS])
def test_bad_requests_are_invalid_argument_naming_the_field(served, request_, message):
    with pytest.raises(grpc.RpcError) as err:
        list(served.stub.Generate(request_))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


# -- fuzzing ------------------------------------------------------------------------------------

ODD_INTS = st.sampled_from([0, 1, -1, VOCAB - 1, VOCAB, 2**31 - 1, -2**31])
ODD_FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 1e-30, 1.0000001, 2.0, 1e30])
ROLES = st.sampled_from(["system", "user", "assistant"])
ODD_ROLES = st.sampled_from(["", "User", "tool", "bot", "user "])
IDS = st.integers(0, VOCAB - 1)


@st.composite
def fuzzed_request(draw, index: int):
    """Mostly well-formed requests with odd values mixed in (each field odd about 1 time in 8),
    so both answers, OK and INVALID_ARGUMENT, are common."""
    def pick(valid, odd):
        return draw(odd) if draw(st.integers(0, 7)) == 5 else draw(valid)

    kind = pick(st.sampled_from(["text", "token_ids", "messages"]), st.none())
    fields = {}
    if kind == "text":
        fields["text"] = pick(st.text(min_size=1, max_size=40), st.just("") | st.text(max_size=3))
    elif kind == "token_ids":
        fields["token_ids"] = pb.TokenIds(ids=pick(st.lists(IDS, min_size=1, max_size=12),
                                                   st.lists(IDS | ODD_INTS, max_size=12)))
    elif kind == "messages":
        message = st.builds(pb.ChatMessage, role=ROLES, content=st.text(max_size=30))
        odd = st.builds(pb.ChatMessage, role=ODD_ROLES | ROLES, content=st.text(max_size=30))
        fields["messages"] = pb.ChatMessages(messages=pick(st.lists(message, min_size=1, max_size=3),
                                                           st.lists(odd, max_size=3)))
    optional = {  # name: (valid, odd)
        # Always set, and small when valid: unset means "the rest of the context" (slow here).
        "max_tokens": (st.integers(1, 3), st.sampled_from([0, -1, CONTEXT, 10**6, -2**31])),
        "temperature": (st.floats(0, 2), ODD_FLOATS),
        "top_k": (st.integers(0, 100), st.integers(-2, 2 * VOCAB) | ODD_INTS),
        "top_p": (st.floats(0.05, 1), ODD_FLOATS),
        "min_p": (st.floats(0, 0.5), ODD_FLOATS),
        "repetition_penalty": (st.floats(0.5, 2), ODD_FLOATS),
        "presence_penalty": (st.floats(-2, 2), ODD_FLOATS),
        "frequency_penalty": (st.floats(-2, 2), ODD_FLOATS),
        "seed": (st.integers(0, 2**32 - 1), st.integers(-2**63, 2**63 - 1)),
        "logprobs": (st.integers(0, 5), st.integers(-2, 25)),
    }
    sampling = {name: pick(*strategies) for name, strategies in optional.items()
                if name == "max_tokens" or draw(st.booleans())}
    sampling["stop"] = pick(st.lists(st.text(min_size=1, max_size=4), max_size=2),
                            st.lists(st.text(max_size=2) | st.text(min_size=250, max_size=300),
                                     max_size=3) | st.lists(st.just("x"), min_size=17, max_size=18))
    sampling["stop_token_ids"] = pick(st.lists(IDS, max_size=2), st.lists(IDS | ODD_INTS, max_size=3))
    sampling["ignore_eos"] = draw(st.booleans())
    request_id = pick(st.just("") | st.from_regex(r"[A-Za-z0-9._:-]{1,20}", fullmatch=True),
                      st.text(max_size=140))
    if request_id:  # unique within the concurrent batch, whatever follows
        request_id = f"fuzz{index}-{request_id}"
    return pb.GenerateRequest(request_id=request_id, sampling=pb.SamplingParams(**sampling),
                              priority=draw(st.integers(-2**31, 2**31 - 1)), **fields)


FUZZ_OUTCOMES: collections.Counter = collections.Counter()


def _outcome(stub, request):
    try:
        chunks = list(stub.Generate(request, timeout=120))
    except grpc.RpcError as e:
        return e.code(), e.details(), None
    return grpc.StatusCode.OK, "", chunks


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(st.tuples(*(fuzzed_request(i) for i in range(10))))
def test_fuzzed_requests_get_ok_or_invalid_argument(served, requests):
    with ThreadPoolExecutor(len(requests)) as pool:
        outcomes = list(pool.map(lambda r: _outcome(served.stub, r), requests))
    for request, (code, details, chunks) in zip(requests, outcomes):
        FUZZ_OUTCOMES[code.name] += 1
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, details, request)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert details and ("=" in details or ":" in details), details
            continue
        last = chunks[-1]
        assert last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH), request
        ids = [t for c in chunks for t in c.token_ids]
        assert len(ids) == last.usage.completion_tokens <= request.sampling.max_tokens
        assert all(0 <= t < VOCAB for t in ids)
        if request.sampling.HasField("logprobs"):
            assert sum(len(c.logprobs) for c in chunks) == len(ids)


def test_after_fuzzing_the_server_is_serving_and_exact(served):
    # Both answers were common (when the fuzz test ran in this session).
    assert not FUZZ_OUTCOMES or min(FUZZ_OUTCOMES["OK"], FUZZ_OUTCOMES["INVALID_ARGUMENT"]) >= 50, \
        FUZZ_OUTCOMES
    health = health_pb2_grpc.HealthStub(served.raw)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    expected = served.offline.result()[0]
    chunks = list(served.stub.Generate(as_request(STREAMED[0])))
    assert "".join(c.text for c in chunks) == expected["text"]
    stats = served.stats()
    assert stats.compilations_after_warmup == 0  # all those sampling settings: no recompile
    assert served.wait_idle() < FREED_WITHIN_S


def test_logprobs_are_streamed_per_token(served):
    request = as_request(STREAMED[0])
    request.sampling.logprobs = 2
    request.sampling.max_tokens = 6
    chunks = list(served.stub.Generate(request))
    ids = [t for c in chunks for t in c.token_ids]
    lps = [lp for c in chunks for lp in c.logprobs]
    assert ids == served.offline.result()[0]["token_ids"][:6]
    assert [lp.token_id for lp in lps] == ids
    for lp in lps:  # greedy: the chosen token is the most likely one
        assert len(lp.top) == 2 and lp.top[0].token_id == lp.token_id
        assert lp.logprob <= 0 and lp.top[0].logprob >= lp.top[1].logprob


# -- reflection, auth, the small RPCs -----------------------------------------------------------

def test_reflection_lists_the_service_and_a_reflection_only_client_can_generate(served):
    database = ProtoReflectionDescriptorDatabase(served.channel)
    assert {"jaxgen.v1.Generation", "grpc.health.v1.Health"} <= set(database.get_services())
    pool = descriptor_pool.DescriptorPool(database)  # not the default pool the stubs fill
    method = pool.FindServiceByName("jaxgen.v1.Generation").methods_by_name["Generate"]
    assert method.server_streaming and not method.client_streaming
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    assert request_cls is not pb.GenerateRequest and request_cls.DESCRIPTOR.file.pool is pool
    request = json_format.ParseDict(
        {"text": STREAMED[0]["text"], "sampling": {"max_tokens": 16, "temperature": 0}}, request_cls())
    generate = served.channel.unary_stream(
        f"/{method.containing_service.full_name}/{method.name}",
        request_serializer=request_cls.SerializeToString, response_deserializer=response_cls.FromString)
    chunks = list(generate(request))
    assert "".join(c.text for c in chunks) == served.offline.result()[0]["text"]
    assert json_format.MessageToDict(chunks[-1])["finishReason"] == "FINISH_REASON_LENGTH"


@pytest.mark.parametrize("metadata, complaint", [
    ((), "missing metadata 'authorization"),
    ((("authorization", "Bearer wrong-key"),), "invalid API key"),
    ((("authorization", API_KEY),), "invalid API key"),  # no "Bearer "
    ((("authorization", f"Basic {API_KEY}"),), "invalid API key"),
])
def test_auth_rejects_missing_or_wrong_keys(served, metadata, complaint):
    stub = pb_grpc.GenerationStub(served.raw)
    for call in (lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata),
                 lambda: list(stub.Generate(pb.GenerateRequest(text="Hi"), metadata=metadata))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert complaint in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # reflection is not open either
        ProtoReflectionDescriptorDatabase(served.raw).get_services()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_auth_accepts_the_right_key_and_leaves_health_open(served):
    stub = pb_grpc.GenerationStub(served.raw)
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=METADATA).vocab_size == VOCAB
    chunks = list(stub.Generate(pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(
        max_tokens=2, temperature=0)), metadata=METADATA))
    assert chunks[-1].usage.completion_tokens >= 1
    health = health_pb2_grpc.HealthStub(served.raw)
    assert health.Check(health_pb2.HealthCheckRequest(service="jaxgen.v1.Generation")).status == \
        health_pb2.HealthCheckResponse.SERVING


def test_model_info(served):
    info = served.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.architecture, info.vocab_size, info.max_context_length, info.num_slots,
            info.page_size, info.num_pages, info.decode_steps, info.max_waiting) == \
        ("llama", VOCAB, CONTEXT, SLOTS, 16, 256, DECODE_STEPS, 1024)
    assert info.max_position_embeddings == 8192 and info.dtype == "float32"
    assert [(a.name, a.size) for a in info.mesh] == [("data", 1), ("model", 1)]
    assert info.device == "cpu x1" and info.has_chat_template and list(info.stop_token_ids)
    assert (info.max_stop_strings, info.max_stop_string_length, info.max_logprobs) == (16, 256, 20)


def test_tokenize_and_detokenize(served):
    stub = served.stub
    ids = list(stub.Tokenize(pb.TokenizeRequest(text="Hello, world!")).token_ids)
    assert ids and stub.Detokenize(pb.DetokenizeRequest(token_ids=ids)).text == "Hello, world!"
    spec = STREAMED[1]
    chat = stub.Tokenize(pb.TokenizeRequest(messages=pb.ChatMessages(
        messages=[pb.ChatMessage(**m) for m in spec["messages"]]))).token_ids
    assert len(chat) == served.offline.result()[1]["prompt_tokens"]
    special = stub.Detokenize(pb.DetokenizeRequest(token_ids=chat)).text
    assert special.startswith("<|im_start|>system")
    plain = stub.Detokenize(pb.DetokenizeRequest(token_ids=chat, skip_special_tokens=True)).text
    assert "<|im_start|>" not in plain and "Name three colours." in plain
    for bad, message in [
        (lambda: stub.Tokenize(pb.TokenizeRequest()), "input: one of text, messages is required"),
        (lambda: stub.Detokenize(pb.DetokenizeRequest(token_ids=[1, VOCAB + 7])), f"token id {VOCAB + 7}"),
        (lambda: stub.Tokenize(pb.TokenizeRequest(messages=pb.ChatMessages(
            messages=[pb.ChatMessage(role="robot")]))), "messages.messages[0].role='robot'"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            bad()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
