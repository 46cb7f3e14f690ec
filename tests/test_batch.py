"""`jaxgen batch` on a tiny random-weight checkpoint (SmolLM2's tokenizer): records equal the HTTP
bodies the offline engine implies; SIGKILL at any point then resume gives every custom_id exactly
once with the uninterrupted output; bad lines become records; duplicate ids are refused up front;
input order; stdin to stdout; memory does not grow with the input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.server_process import MODEL, ROOT, child_env, ensure_model

TINY = {"architecture": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 1024, "tie_embeddings": True,
        "dtype": "float32"}
ENGINE = ["--slots", "2", "--max-model-len", "256", "--num-pages", "64", "--decode-steps", "1",
          "--max-prefill-tokens", "64", "--quiet"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, cache_dir):
    """A random-weight checkpoint of a tiny Llama shape with SmolLM2's tokenizer."""
    from jaxgen.checkpoints import orbax_format, registry
    from jaxgen.models import Model, ModelConfig
    from jaxgen.tokenizer import load_tokenizer

    ensure_model(cache_dir)
    tokenizer = load_tokenizer(os.path.join(registry.cache_dir(cache_dir), "models", MODEL, "tokenizer"))
    cfg = ModelConfig(**dict(TINY, vocab_size=tokenizer.vocab_size))
    model = Model(cfg)
    path = str(tmp_path_factory.mktemp("tiny") / "ckpt")
    orbax_format.save(path, cfg, model.canonical_params(model.init_random(seed=0)), tokenizer)
    return path


def lines(n: int, max_tokens: int = 24, start: int = 0) -> list[dict]:
    """A mix of completion and chat lines; many share a prefix (a few-shot header)."""
    out = []
    for i in range(start, start + n):
        if i % 4 == 3:
            url, body = "/v1/chat/completions", {"messages": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": f"Question number {i}?"}]}
        else:
            url, body = "/v1/completions", {"prompt": "Examples: one, two, three. " * 3 + f"Item {i}:"}
        body |= {"max_tokens": max_tokens - i % 5, "temperature": 0, "ignore_eos": True}
        out.append({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})
    return out


def write(path, records, extra: str = "") -> str:
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + extra)
    return str(path)


def batch(tiny, xla_cache_dir, *args, wait=True, **kw):
    cmd = [sys.executable, "-m", "jaxgen.cli", "batch", *map(str, args), "--model", tiny,
           "--compilation-cache-dir", xla_cache_dir, *ENGINE]
    if not wait:
        return subprocess.Popen(cmd, env=child_env(), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=child_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kw)


def records(path) -> list[dict]:
    """OUTPUT's records ([] before it exists); fails unless every line is whole JSON, except
    a torn last line (what a kill mid-write leaves, repaired on resume), which is left out."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        text = f.read()
    whole = text[:text.rfind("\n") + 1]
    return [json.loads(line) for line in whole.splitlines()]


def outcome(record: dict):
    """What must not change between runs: status and the choices' text and usage."""
    r = record["response"]
    if r is None or r["status_code"] != 200:
        return record["custom_id"], None if r is None else r["status_code"]
    body = r["body"]
    texts = [c.get("text", c.get("message", {}).get("content")) for c in body["choices"]]
    return record["custom_id"], texts, body["usage"]["completion_tokens"]


@pytest.fixture(scope="module")
def reference(tiny, xla_cache_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("reference")
    inp = write(work / "in.jsonl", lines(24))
    run = batch(tiny, xla_cache_dir, inp, work / "out.jsonl")
    assert run.returncode == 0, run.stderr
    return inp, sorted(outcome(r) for r in records(work / "out.jsonl"))


def test_records_are_the_http_bodies_of_the_offline_engine(tiny, reference, cache_dir):
    """Each record's body is what /v1/completions would answer: checked against the offline
    engine (Engine.generate) on the same prompts."""
    from jaxgen.build import build_engine
    from jaxgen.config import Config, EngineConfig, ModelSource
    from jaxgen.sampling_params import SamplingParams

    inp, want = reference
    engine = build_engine(Config(ModelSource(tiny), EngineConfig(
        num_slots=2, max_model_len=256, num_pages=64, decode_steps=1, max_prefill_tokens=64,
        warmup=False)))
    specs = lines(24)
    tok = engine.tokenizer
    prompts = [tok.encode_chat(s["body"]["messages"]) if "messages" in s["body"]
               else tok.encode(s["body"]["prompt"]) for s in specs]
    done = engine.generate(prompts, [SamplingParams(max_tokens=s["body"]["max_tokens"],
                                                    temperature=0, ignore_eos=True) for s in specs])
    assert want == sorted((s["custom_id"], [c.text], len(c.token_ids)) for s, c in zip(specs, done))


def test_sigkill_at_any_point_then_resume_gives_every_line_once(tiny, xla_cache_dir, reference,
                                                                 tmp_path):
    inp, want = reference
    out = tmp_path / "out.jsonl"
    for kill_after in (0, 5, 15):  # records in OUTPUT when the job is killed
        job = batch(tiny, xla_cache_dir, inp, out, wait=False)
        deadline = time.monotonic() + 120
        while len(records(out)) < kill_after:
            assert job.poll() is None and time.monotonic() < deadline, job.stderr.read()
            time.sleep(0.005)
        job.send_signal(signal.SIGKILL)
        job.wait(30)
        records(out)  # valid JSONL (a torn last line at most: that is repaired on resume)
    with open(out) as f:  # a kill mid-write, as the test writes it
        text = f.read()
    cut = text.rstrip("\n").rfind("\n") + 1
    with open(out, "w") as f:
        f.write(text[:cut + (len(text) - cut) // 2])
    run = batch(tiny, xla_cache_dir, inp, out)
    assert run.returncode == 0, run.stderr
    got = records(out)
    assert sorted(r["custom_id"] for r in got) == sorted(w[0] for w in want)  # each exactly once
    assert sorted(outcome(r) for r in got) == want
    again = batch(tiny, xla_cache_dir, inp, out, "--summary-json", tmp_path / "s.json")
    assert again.returncode == 0 and len(records(out)) == len(want)  # all done: nothing added
    summary = json.loads((tmp_path / "s.json").read_text())
    assert (summary["skipped"], summary["ok"], summary["complete"]) == (len(want), 0, True)


def test_sigterm_stops_admitting_and_leaves_a_file_that_resumes(tiny, xla_cache_dir, reference,
                                                                 tmp_path):
    inp, want = reference
    out = tmp_path / "out.jsonl"
    job = batch(tiny, xla_cache_dir, inp, out, "--drain-timeout", "30", wait=False)
    deadline = time.monotonic() + 120
    while len(records(out)) < 3:
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 1 and "run the same command again to resume" in err
    partial = records(out)
    assert 3 <= len(partial) < len(want)
    assert batch(tiny, xla_cache_dir, inp, out).returncode == 0
    assert sorted(outcome(r) for r in records(out)) == want


def test_bad_lines_become_records_and_the_others_complete(tiny, xla_cache_dir, tmp_path):
    good = lines(3)
    bad = [
        {"custom_id": "wrong-type", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": 5, "max_tokens": 2}},
        {"custom_id": "cold", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "x", "temperature": -1}},
        {"custom_id": "where", "method": "POST", "url": "/v1/embeddings", "body": {}},
        {"custom_id": "who", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "x", "model": "gpt-4"}},
        {"custom_id": "nobody", "method": "POST", "url": "/v1/completions"},
        {"custom_id": "many", "method": "POST", "url": "/v1/completions",  # never fits the queue
         "body": {"prompt": "x", "n": 5, "max_tokens": 2}},
    ]
    inp = write(tmp_path / "in.jsonl", good[:1] + bad + good[1:], extra='{"custom_id": "torn", ')
    run = batch(tiny, xla_cache_dir, inp, tmp_path / "out.jsonl", "--order", "input",
                "--max-waiting", "4")
    assert run.returncode == 0, run.stderr
    got = {r["custom_id"]: r for r in records(tmp_path / "out.jsonl")}
    assert list(got) == ["req-0", "wrong-type", "cold", "where", "who", "nobody", "many",
                         "req-1", "req-2", "line-10"]  # input order; the torn line by its number
    status = {k: (r["response"] or {}).get("status_code") for k, r in got.items()}
    assert status == {"req-0": 200, "wrong-type": 400, "cold": 400, "where": None, "who": 404,
                      "nobody": None, "many": 400, "req-1": 200, "req-2": 200, "line-10": None}
    assert "n=5: more choices than this job's queue holds (max_waiting=4)" in \
        got["many"]["response"]["body"]["error"]["message"]
    assert "temperature=-1" in got["cold"]["response"]["body"]["error"]["message"]
    assert "url='/v1/embeddings'" in got["where"]["error"]["message"]
    assert "body: field required" in got["nobody"]["error"]["message"]
    assert "line 10: not valid JSON" in got["line-10"]["error"]["message"]


def test_an_engine_already_started_is_refused(tiny, tmp_path):
    """The job steps the engine itself: a started engine's loop thread would step it too."""
    from jaxgen.batch import run
    from jaxgen.build import build_engine
    from jaxgen.config import Config, EngineConfig, ModelSource

    engine = build_engine(Config(ModelSource(tiny), EngineConfig(
        num_slots=2, max_model_len=256, num_pages=64, warmup=False)))
    engine.start()
    try:
        with pytest.raises(ValueError, match="engine: must not be started"):
            run(write(tmp_path / "in.jsonl", lines(1)), str(tmp_path / "out.jsonl"), engine=engine)
    finally:
        engine.stop()


def test_duplicate_custom_ids_are_refused_before_any_work(tiny, xla_cache_dir, tmp_path):
    specs = lines(4)
    specs[3]["custom_id"] = specs[1]["custom_id"] = "same"
    run = batch(tiny, xla_cache_dir, write(tmp_path / "in.jsonl", specs), tmp_path / "out.jsonl")
    assert run.returncode == 2
    assert "duplicate custom_id: 'same' on lines 2, 4" in run.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_stdin_to_stdout(tiny, xla_cache_dir, reference):
    inp, want = reference
    with open(inp) as f:
        run = batch(tiny, xla_cache_dir, "-", "-", stdin=f)
    assert run.returncode == 0, run.stderr
    got = [json.loads(line) for line in run.stdout.splitlines()]
    assert sorted(outcome(r) for r in got) == want


def test_python_api_and_memory_does_not_grow_with_the_input(tiny, xla_cache_dir, tmp_path):
    """Peak RSS after a 2,000-line job within a few MB of the peak after a 200-line one, run
    before it in the same process (the engine holds a bounded window of lines; nothing is
    buffered per line). tools/bench_batch.py measures 20,000 lines."""
    code = """
import json, resource, sys
from jaxgen.batch import BatchOptions, run
from jaxgen.config import Config, EngineConfig, ModelSource
config = Config(ModelSource(sys.argv[2]), EngineConfig(num_slots=8, max_model_len=128,
                num_pages=64, decode_steps=1, max_prefill_tokens=128), compilation_cache_dir=sys.argv[3])
for n in (200, 2000):
    inp, out = f"{sys.argv[1]}/{n}.jsonl", f"{sys.argv[1]}/{n}.out"
    with open(inp, "w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"prompt": f"Line {i} of a long file.", "max_tokens": 1}}) + "\\n")
    s = run(inp, out, config, BatchOptions(quiet=True))
    print(json.dumps({"n": n, "ok": s.ok, "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path), tiny, xla_cache_dir],
                         env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [(r["n"], r["ok"]) for r in results] == [(200, 200), (2000, 2000)]
    peaks = {r["n"]: r["rss_kb"] for r in results}
    assert peaks[2000] - peaks[200] < 8 * 1024, peaks


def test_cache_salt_narrows_the_prefix_cache_to_lines_of_the_same_salt(tiny, xla_cache_dir,
                                                                        tmp_path):
    """A job is one tenant: a line reuses the cached prompt pages of an earlier line only when
    both carry the same `cache_salt` (none is a salt of its own); the output does not change."""
    from jaxgen.batch import BatchOptions, run
    from jaxgen.config import Config, EngineConfig, ModelSource

    shared = "Examples: one, two, three. " * 6 + "Item:"  # several whole pages of 16 tokens

    def line(i, salt, prompt=shared):
        body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        if salt is not None:
            body["cache_salt"] = salt
        return {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}

    # Two slots: r0 and r1 run first, then r2 and r3, then r4 (all after r0 finished).
    specs = [line(0, "a"), line(1, None, "Something else, to fill the other slot."),
             line(2, "b"), line(3, "a"), line(4, None)]
    out = tmp_path / "out.jsonl"
    config = Config(ModelSource(tiny), EngineConfig(num_slots=2, max_model_len=256, num_pages=64,
                                                    decode_steps=1, max_prefill_tokens=64),
                    compilation_cache_dir=xla_cache_dir)
    summary = run(write(tmp_path / "in.jsonl", specs), str(out), config, BatchOptions(quiet=True))
    assert summary.ok == len(specs)
    bodies = {r["custom_id"]: r["response"]["body"] for r in records(out)}
    cached = {k: b["usage"]["prompt_tokens_details"]["cached_tokens"] for k, b in bodies.items()}
    assert cached["r3"] >= 16, cached  # salt "a" again: r0's pages
    assert cached["r0"] == cached["r2"] == cached["r4"] == 0, cached  # first of their salt
    texts = {k: b["choices"][0]["text"] for k, b in bodies.items()}
    assert texts["r0"] == texts["r2"] == texts["r3"] == texts["r4"]
