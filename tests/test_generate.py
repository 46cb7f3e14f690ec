"""The static-batch generator against its slow twin (full-forward greedy per token), seeded
sampling independent of batch mates, and input validation."""

import json
import subprocess
import sys

import numpy as np
import pytest

from jaxgen.generate import Generator
from jaxgen.models import Model
from tests.helpers import TINY_GEMMA3, TINY_LLAMA, naive_greedy


@pytest.fixture(scope="module", params=[TINY_GEMMA3, TINY_LLAMA], ids=["gemma3", "llama"])
def tiny(request):
    model = Model(request.param)
    return model, model.init_random(seed=7)


def test_batched_greedy_equals_naive_full_forward(tiny):
    model, params = tiny
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (3, 17, 1, 30)]
    gen = Generator(model, params, decode_steps=4)
    stop = {int(rng.integers(0, 256))}
    got = gen.generate(prompts, max_tokens=13, stop_ids=stop)
    for prompt, completion in zip(prompts, got):
        want = naive_greedy(model, params, prompt, 13, stop)
        assert completion.token_ids == want
        assert completion.finish_reason == ("stop" if want[-1] in stop else "length")


def test_seeded_sampling_ignores_batch_mates(tiny):
    model, params = tiny
    gen = Generator(model, params, decode_steps=3)
    prompt = [1, 2, 3, 4, 5]
    alone = gen.generate([prompt], max_tokens=10, temperature=1.0, seed=42)[0].token_ids
    crowd = gen.generate([[9] * 12, prompt, [7, 7]], max_tokens=10, temperature=1.0, seed=42)
    assert crowd[1].token_ids == alone
    other_seed = gen.generate([prompt], max_tokens=10, temperature=1.0, seed=43)[0].token_ids
    assert other_seed != alone  # 10 tokens from a 256-way distribution: equal only by accident


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompts=[[1, 2]], max_tokens=0), "max_tokens=0: must be >= 1"),
    (dict(prompts=[[]], max_tokens=4), r"prompts\[0\] is empty"),
    (dict(prompts=[[1, 999]], max_tokens=4), r"token id 999 outside the vocabulary \[0, 256\)"),
    (dict(prompts=[[1] * 1000], max_tokens=100), "exceeds the model's context of 1024"),
    (dict(prompts=[[1]], max_tokens=4, temperature=-1.0), "temperature=-1.0: must be"),
])
def test_bad_requests_name_the_field(tiny, kwargs, message):
    model, params = tiny
    with pytest.raises(ValueError, match=message):
        Generator(model, params).generate(**kwargs)


def test_generate_cli_json(cache_dir):
    run = subprocess.run(
        [sys.executable, "-m", "jaxgen.cli", "generate", "The capital of France is", "2+2=",
         "--model", "smollm2-135m", "--max-tokens", "8", "--json", "--cache-dir", cache_dir],
        capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["prompt"] for r in lines] == ["The capital of France is", "2+2="]
    for r in lines:
        assert set(r) == {"prompt", "text", "token_ids", "finish_reason"}
        assert r["finish_reason"] in ("stop", "length") and 1 <= len(r["token_ids"]) <= 8
    assert "Paris" in lines[0]["text"]
