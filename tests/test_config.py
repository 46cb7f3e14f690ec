"""The deployment config: flags, presets (YAML and JSON) and the environment -> one validated
`Config` -> `build_engine`, for `generate` and `serve`; bad values name the setting, the value
and the limit; aliases of vLLM / SGLang flags; dtype "auto"."""

from __future__ import annotations

import re

import pytest

from jaxgen.cli import parser
from jaxgen.config import Config, ConfigError, EngineConfig, ModelSource, ServerConfig
from jaxgen.config_sources import config_from_args, read_api_keys, read_preset
from tests.server_process import ROOT


def config(*argv, environ=None, command=None):
    args = parser().parse_args(list(argv))
    return config_from_args(args, command or argv[0], environ or {})


@pytest.mark.parametrize("fields, message", [
    (dict(port=70000), "port=70000: must be in [0, 65535]"),
    (dict(tls_cert="server.crt"), "tls_key=None: TLS needs both a certificate and a key"),
    (dict(api_keys=("ok", "has space")), "api_keys='<hidden>': each key must be non-empty"),
    (dict(max_message_bytes=10), "max_message_bytes=10: must be an integer >= 1024"),
    (dict(drain_timeout_s=-1.0), "drain_timeout_s=-1.0: must be >= 0"),
    (dict(profiler_port=0), "profiler_port=0: must be in [1, 65535]"),  # the only check of it
])
def test_server_config_validation_names_the_field(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ServerConfig(**fields)


@pytest.mark.parametrize("argv, message", [
    (["serve", "--slots", "0"], "slots=0: must be an integer >= 1"),
    (["serve", "--max-num-seqs", "0"], "slots=0: must be an integer >= 1"),
    (["generate", "x", "--page-size", "24"], "page-size=24: must be a positive multiple of 16"),
    (["serve", "--gpu-memory-utilization", "1.5"], "gpu-memory-utilization=1.5: must be in (0, 1]"),
    (["serve", "--max-model-len", "1"], "max-model-len=1: must be an integer >= 2"),
    (["serve", "--mesh", "2"], "mesh='2': must be two positive sizes (data, model)"),
    (["serve", "--mesh", "a,b"], "mesh='a,b': must look like DATA,MODEL"),
    (["serve", "--mesh", "1,2", "--tensor-parallel-size", "4"], "mesh='1,2': disagrees with"),
    (["serve", "--port", "70000"], "port=70000: must be in [0, 65535]"),
    (["serve", "--max-waiting", "0"], "max-waiting=0: must be an integer >= 1"),
    (["serve", "--step-timeout", "0.5"], "=0.5: must be 0 (off) or >= 5s with the engine in its own"),
    (["serve", "--step-timeout", "-1"], "step-timeout=-1.0: must be >= 0 (0: no watchdog)"),
    (["serve", "--max-queue-time", "0"], "max-queue-time=0.0: must be > 0 (unset: no limit)"),
    (["serve", "--max-engine-restarts", "-1"], "max-engine-restarts=-1: must be an integer >= 0"),
    (["serve", "--stream-stall-timeout", "0"], "stream-stall-timeout=0.0: must be > 0"),
    (["serve", "--stream-buffer-tokens", "0"], "stream-buffer-tokens=0: must be an integer >= 1"),
    (["serve", "--speculative-max-batch", "0"], "speculative-max-batch=0: must be an integer >= 1"),
    (["serve", "--prefix-cache-scope", "key"], "prefix-cache-scope='key': needs API keys"),
])
def test_bad_values_name_the_setting_the_value_and_the_limit(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config(*argv)


def test_a_short_step_timeout_is_fine_with_the_engine_on_a_thread():
    assert config("serve", "--step-timeout", "0.5", "--no-engine-process").engine.step_timeout_s == 0.5


def test_flags_become_one_config():
    c = config("serve", "--model", "smollm2-135m", "--max-num-seqs", "4",
               "--max-num-batched-tokens", "128", "--tensor-parallel-size", "2",
               "--data-parallel-size", "2", "--dtype", "bfloat16", "--no-prefix-cache",
               "--served-model-name", "small", "--port", "0", "--no-engine-process")
    assert c.model == ModelSource("smollm2-135m", "bfloat16", None, "small")
    assert c.model.name == "small" and ModelSource("smollm2-135m").name == "smollm2-135m"
    assert (c.engine.num_slots, c.engine.max_prefill_tokens, c.engine.enable_prefix_cache) == (4, 128, False)
    assert c.mesh == (2, 2) and c.server.port == 0 and c.server.engine_process is False
    assert c.engine.warmup  # serve always warms up
    assert config("generate", "x").engine.warmup is False  # one-shot: compiles what runs
    assert config("generate", "x", "--warmup").engine.warmup is True
    default = config("serve")
    assert default == Config(engine=EngineConfig(), server=ServerConfig())
    assert default.model.dtype == "auto" and default.model.name == "gemma3-270m"


@pytest.mark.parametrize("suffix, text", [
    (".json", '{"model": "smollm2-135m", "slots": 4, "--decode-steps": 2, "max_waiting": 9,'
              ' "engine-process": false}'),
    (".yaml", "model: smollm2-135m\nslots: 4\n--decode-steps: 2\nmax_waiting: 9\n"
              "engine-process: false\n"),
])
def test_preset_values_apply_and_flags_win(tmp_path, suffix, text):
    preset = tmp_path / f"p{suffix}"
    preset.write_text(text)
    c = config("serve", "--config", str(preset), "--slots", "6")
    assert c.model.model == "smollm2-135m" and c.engine.num_slots == 6  # the flag wins
    assert (c.engine.decode_steps, c.engine.max_waiting, c.server.engine_process) == (2, 9, False)
    assert config("serve", "--config", str(preset), "--engine-process").server.engine_process


def test_environment_sits_between_flags_and_preset(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("cache-dir: /from/preset\n")
    env = {"JAXGEN_CACHE_DIR": "/from/env", "JAXGEN_COMPILATION_CACHE_DIR": "/xla/env"}
    assert config("serve", "--config", str(preset)).model.cache_dir == "/from/preset"
    c = config("serve", "--config", str(preset), environ=env)
    assert (c.model.cache_dir, c.compilation_cache_dir) == ("/from/env", "/xla/env")
    assert config("serve", "--cache-dir", "/flag", environ=env).model.cache_dir == "/flag"


def test_preset_reading_checks_names_and_types(tmp_path):
    preset = tmp_path / "p.json"
    preset.write_text('{"slots": 4, "--drain-timeout": 2, "model": "m", "api-key": ["k"], "warmup": true}')
    assert read_preset(str(preset)) == dict(slots=4, drain_timeout=2, model="m", api_key=["k"],
                                            warmup=True)
    for text, message in [('{"slotz": 4}', "unknown setting 'slotz'"),
                          ('{"slots": "4"}', "slots='4': expected int"),
                          ('{"slots": true}', "slots=True: expected int"),
                          ('{"dtype": "float16"}', "dtype='float16': must be one of"),
                          ('[1]', "expected a mapping"), ('{', "not valid JSON")]:
        preset.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_preset(str(preset))
    yaml_preset = tmp_path / "p.yaml"
    yaml_preset.write_text("slots: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        read_preset(str(yaml_preset))


def test_every_bundled_preset_is_valid():
    presets = sorted((ROOT / "configs" / "serving").glob("*.json")) + \
        sorted((ROOT / "configs" / "serving").glob("*.yaml"))
    assert presets
    for path in presets:
        assert config("serve", "--config", str(path)).model.model


def test_api_keys_from_flags_file_and_environment(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# production keys\n\n  b  \nc\n")
    assert read_api_keys(["a"], str(keys), environ={"JAXGEN_API_KEYS": "d, a,"}) == ("a", "b", "c", "d")
    assert read_api_keys([], None, environ={"JAXGEN_API_KEY": "e,f", "JAXGEN_API_KEYS": "g"}) == \
        ("e", "f", "g")
    assert read_api_keys([], None, environ={}) == ()
    c = config("serve", "--api-key", "a", "--api-keys-file", str(keys), environ={"JAXGEN_API_KEY": "z"})
    assert c.server.api_keys == ("a", "b", "c", "z")


def test_client_sends_the_first_key_of_the_shared_variable():
    from jaxgen.server.cli import client_api_key

    assert client_api_key({"JAXGEN_API_KEY": " k1 ,k2"}) == "k1"
    assert client_api_key({}) is None


def test_help_shows_every_default():
    import argparse

    for command in ("generate", "batch", "serve", "client", "profile", "plan"):
        sub = next(a for a in parser()._actions if a.dest == "command").choices[command]
        text = " ".join(sub.format_help().split())
        options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
        for action in options:
            # Settings say their default in the help; other flags get it from the formatter.
            shown = "(default: " in action.help or action.default is not argparse.SUPPRESS
            assert shown, (command, action.option_strings)
        assert text.count("(default: ") == len(options), command


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("jaxgen ")


def test_dtype_auto_is_bfloat16_on_accelerators_and_float32_on_cpu():
    from jaxgen.build import resolve_dtype

    assert [resolve_dtype("auto", p) for p in ("cpu", "gpu", "tpu")] == \
        ["float32", "bfloat16", "bfloat16"]
    assert resolve_dtype("float32", "gpu") == "float32"


def test_engine_config_derives_the_shared_shapes_once():
    from jaxgen.engine import scheduler_config

    c = EngineConfig(num_slots=3, page_size=32, decode_steps=4, max_prefill_tokens=100).resolved(8192)
    assert c.max_model_len == 4096 and c.pages_per_seq == -(-(4096 + 4) // 32)
    assert c.prefill_buckets == (16, 32, 64, 100)
    s = scheduler_config(c, num_pages=300, model_stop_ids={1})
    assert (s.num_slots, s.page_size, s.decode_steps, s.max_prefill_tokens, s.max_model_len) == \
        (3, 32, 4, 100, 4096)
    with pytest.raises(ConfigError, match="max_model_len=9000: exceeds the model's context of 8192"):
        EngineConfig(max_model_len=9000).resolved(8192)


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_flags_to_config_to_engine(cache_dir, command):
    """The engine `build_engine` makes is the one the flags describe, for both commands."""
    import dataclasses

    from jaxgen.build import build_engine

    argv = [command] + (["hi"] if command == "generate" else []) + [
        "--model", "smollm2-135m", "--cache-dir", cache_dir, "--max-num-seqs", "3",
        "--max-model-len", "256", "--num-pages", "40", "--decode-steps", "2",
        "--max-num-batched-tokens", "32", "--served-model-name", "tiny-chat"]
    c = config(*argv)
    c = dataclasses.replace(c, engine=dataclasses.replace(c.engine, warmup=False))
    engine = build_engine(c)
    info = engine.info()
    assert (info.name, info.num_slots, info.max_model_len, info.num_pages, info.decode_steps,
            info.max_prefill_tokens, info.dtype) == ("tiny-chat", 3, 256, 40, 2, 32, "float32")
    assert engine.stats().num_free_slots == 3


def test_configuration_page_lists_every_setting():
    """docs/configuration.md carries the table generated from SETTINGS (regenerate with
    `python tools/gen_config_docs.py --write`)."""
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    import gen_config_docs

    page = gen_config_docs.DOC.read_text()
    assert gen_config_docs.rendered(page) == page, "run python tools/gen_config_docs.py --write"


def test_the_compilation_cache_is_bounded_and_locked(tmp_path):
    """JAX locks its cache entries only when a size limit is set: a bounded cache is what lets
    processes of one host (a server and the engine process it restarts, a group's processes)
    share one without reading a half-written entry; a bad limit names the variable."""
    import os
    import subprocess
    import sys

    code = """
import os, sys, jax
from jaxgen.runtime.compile_cache import enable_compilation_cache
enable_compilation_cache(sys.argv[1])
jax.jit(lambda x: x * 3 + 1)(jax.numpy.ones(4)).block_until_ready()
print(jax.config.jax_compilation_cache_max_size, os.path.exists(os.path.join(sys.argv[1], ".lockfile")),
      sum(name.endswith("-cache") for name in os.listdir(sys.argv[1])))
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               JAXGEN_COMPILATION_CACHE_MAX_BYTES=str(1 << 30))
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "xla")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    limit, locked, entries = run.stdout.split()
    assert (limit, locked) == (str(1 << 30), "True") and int(entries) >= 1
    # A cache written with no limit (an earlier jaxgen) has entries with no last-use stamp, on
    # which JAX's eviction scan failed and with it every write: nothing new was cached.
    cache = tmp_path / "xla"
    for stamp in cache.glob("*-atime"):
        stamp.unlink()
    run = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c",
                          code.replace("x * 3 + 1", "x * 5 - 2"), str(cache)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout.split()[2]) > int(entries)  # the new program was written
    assert len(list(cache.glob("*-atime"))) == len(list(cache.glob("*-cache")))
    env["JAXGEN_COMPILATION_CACHE_MAX_BYTES"] = "lots"
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "xla")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "JAXGEN_COMPILATION_CACHE_MAX_BYTES='lots': must be a whole number of bytes >= 1" in run.stderr
