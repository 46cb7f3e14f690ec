"""`jaxgen generate` on the engine: JSON output, prompts file, stop strings, streaming text,
and request validation messages that name the field."""

import json
import subprocess
import sys

import pytest

from jaxgen.sampling_params import SamplingParams


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxgen.cli", *args], capture_output=True, text=True)


def test_generate_json_prompts_file_and_stop(tmp_path, cache_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("2+2=\n\nName a colour:\n")
    run = run_cli("generate", "The capital of France is", "--prompts-file", str(prompts),
                  "--model", "smollm2-135m", "--max-tokens", "8", "--json", "--cache-dir", cache_dir,
                  "--stop", "\n\n", "--compilation-cache-dir", "off")
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["prompt"] for r in lines] == ["The capital of France is", "2+2=", "Name a colour:"]
    for r in lines:
        assert set(r) == {"prompt", "text", "token_ids", "finish_reason", "usage"}
        assert r["finish_reason"] in ("stop", "length") and 1 <= len(r["token_ids"]) <= 8
        assert "\n\n" not in r["text"]
    assert "Paris" in lines[0]["text"]


def test_generate_streams_text(cache_dir):
    run = run_cli("generate", "Hi", "--chat", "--model", "smollm2-135m", "--max-tokens", "12",
                  "--cache-dir", cache_dir)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("> Hi\n") and "finish:" in run.stdout


def test_no_prompts_is_a_user_error():
    run = run_cli("generate", "--model", "smollm2-135m")
    assert run.returncode == 2 and "no prompts" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_tokens=0), "max_tokens=0: must be an integer >= 1"),
    (dict(temperature=-1.0), "temperature=-1.0: must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(top_p=0.0), r"top_p=0.0: must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k=-1: must be >= 0"),
    (dict(min_p=1.0), r"min_p=1.0: must be in \[0, 1\)"),
    (dict(stop=("",)), "each stop string must have 1..256 characters"),
    (dict(stop=tuple("abcdefghijklmnopq")), "at most 16 stop strings"),
    (dict(logprobs=21), r"logprobs=21: must be in \[0, 20\]"),
    (dict(seed=-1), r"seed=-1: must be in \[0, 2\*\*32\)"),
])
def test_sampling_params_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_stop_ids_combine_model_and_request_ids():
    assert SamplingParams(stop_token_ids=(5,)).stop_ids({1}) == {1, 5}
    assert SamplingParams(stop_token_ids=(5,), ignore_eos=True).stop_ids({1}) == {5}
