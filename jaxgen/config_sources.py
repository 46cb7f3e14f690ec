"""Building the deployment `Config` at the edge: command-line flags, a preset file (YAML or
JSON) and environment variables, with flags winning over the environment, and the environment
over the preset.

Every setting is declared once in `SETTINGS`: its flags (the first is its name in presets and
error messages; the others are aliases a vLLM or SGLang user knows), the config field it sets,
its type, and its help. The flags' help shows each default, read from the config dataclasses;
argparse leaves unset flags out of the namespace, so a preset or the environment can tell "not
given" from "given as the default". Standard library (and PyYAML for .yaml presets) only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping

from jaxgen.config import (DISTRIBUTED_MODES, DTYPES, LOG_LEVELS, PREFIX_CACHE_SCOPES,
                           RESTART_WINDOW_S, STEP_TIMEOUT_FLOOR_S, STEP_TIMEOUT_WARMUP_FACTOR, Config,
                           ConfigError, DistributedConfig, EngineConfig, ModelSource, ServerConfig)

API_KEY_ENV = "JAXGEN_API_KEY"  # comma-separated keys the server accepts; the key a client sends
OLD_API_KEYS_ENV = "JAXGEN_API_KEYS"  # still read by the server
CACHE_ENV = "JAXGEN_CACHE_DIR"
COMPILATION_CACHE_ENV = "JAXGEN_COMPILATION_CACHE_DIR"
MODEL_COMMANDS = frozenset({"generate", "serve", "batch"})
SERVE = frozenset({"serve"})


@dataclasses.dataclass(frozen=True)
class Setting:
    flags: tuple[str, ...]  # "--slots", then aliases
    target: str  # "engine.num_slots", "mesh", ...: where the value goes in Config
    type: type  # int, float, str, bool or list (of str)
    help: str
    env: str | None = None
    choices: tuple | None = None
    metavar: str | None = None
    commands: frozenset[str] = MODEL_COMMANDS
    default_text: str | None = None  # shown instead of the dataclass default

    @property
    def name(self) -> str:
        return self.flags[0].lstrip("-")

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


def _s(*flags, target, type=str, help, **kw) -> Setting:
    return Setting(tuple(flags), target, type, help, **kw)


SETTINGS: tuple[Setting, ...] = (
    # -- model ----------------------------------------------------------------------------
    _s("--model", target="model.model",
       help="bundled model name (gemma3-270m, smollm2-135m) or a path to a .gguf file, an HF "
            "checkpoint dir or a jaxgen checkpoint dir"),
    _s("--served-model-name", target="model.served_model_name",
       help="the model's name in the API and logs", default_text="the --model value"),
    _s("--dtype", target="model.dtype", choices=DTYPES,
       help="parameter and activation dtype (auto: bfloat16 on GPU and TPU, float32 on CPU)"),
    _s("--cache-dir", target="model.cache_dir", env=CACHE_ENV, metavar="DIR",
       help="where bundled models are converted on first use",
       default_text=f"${CACHE_ENV} or ~/.cache/jaxgen"),
    _s("--mesh", target="mesh", metavar="DATA,MODEL",
       help="device mesh (e.g. 1,8: tensor parallel over 8 devices)", default_text="one device"),
    _s("--tensor-parallel-size", target="tensor_parallel", type=int, metavar="N",
       help="shorthand for --mesh 1,N (with --data-parallel-size D: --mesh D,N)", default_text="1"),
    _s("--data-parallel-size", target="data_parallel", type=int, metavar="N",
       help="shorthand for --mesh N,1 (batch slots split over N devices)", default_text="1"),
    _s("--compilation-cache-dir", target="compilation_cache_dir", env=COMPILATION_CACHE_ENV,
       metavar="DIR", help="persistent XLA compilation cache, least recently used programs evicted past "
       "$JAXGEN_COMPILATION_CACHE_MAX_BYTES (16 GiB); 'off' disables it",
       default_text=f"${COMPILATION_CACHE_ENV} or ~/.cache/jaxgen/xla"),
    # -- engine ---------------------------------------------------------------------------
    _s("--slots", "--max-num-seqs", target="engine.num_slots", type=int,
       help="decode batch rows: requests running at once"),
    _s("--page-size", target="engine.page_size", type=int, help="tokens per KV page (multiple of 16)"),
    _s("--num-pages", target="engine.num_pages", type=int,
       help="KV page pool size", default_text="from --gpu-memory-utilization; 1024 on CPU"),
    _s("--gpu-memory-utilization", target="engine.memory_utilization", type=float, metavar="SHARE",
       help="share of free device memory for the KV page pool, on every platform (on CPU: of "
            "available host memory); ignored with --num-pages",
       default_text="0.5 on GPU and TPU; on CPU a fixed 1024 pages"),
    _s("--max-model-len", target="engine.max_model_len", type=int,
       help="longest prompt + completion", default_text="min(model context, 4096)"),
    _s("--decode-steps", target="engine.decode_steps", type=int,
       help="tokens each request advances per device call (on-device loop)"),
    _s("--max-prefill-tokens", "--max-num-batched-tokens", target="engine.max_prefill_tokens",
       type=int, help="prompt tokens prefilled per step (longer prompts are chunked)"),
    _s("--max-waiting", target="engine.max_waiting", type=int,
       help="waiting-queue bound; past it requests are refused (RESOURCE_EXHAUSTED / 429)"),
    _s("--max-queue-time", target="engine.max_queue_time_s", type=float, metavar="SECONDS",
       help="a request still waiting to be scheduled after this long is shed "
            "(RESOURCE_EXHAUSTED / 429)", default_text="no limit"),
    _s("--step-timeout", target="engine.step_timeout_s", type=float, metavar="SECONDS",
       help="a device step running longer marks the engine hung: with the engine in its own "
            "process it is killed and restarted, on a thread the server exits non-zero; 0: off",
       # An engine loop thread (start()) is watched; a batch job steps the engine itself.
       commands=frozenset({"serve", "generate"}),
       default_text=f"the larger of {STEP_TIMEOUT_FLOOR_S:g}s and "
                    f"{STEP_TIMEOUT_WARMUP_FACTOR:g}x the slowest warm-up call"),
    _s("--prefix-cache", target="engine.enable_prefix_cache", type=bool,
       help="share the KV pages of prompt prefixes already computed"),
    _s("--warmup", target="engine.warmup", type=bool,
       help="compile every shape before serving (always on for serve)",
       commands=frozenset({"generate", "batch"})),
    _s("--overlap-launch", target="engine.overlap_launch", type=bool,
       help="dispatch device steps from a launcher thread, overlapping the host's per-step work"),
    _s("--speculative", target="engine.speculative", choices=("ngram",),
       help="speculative decoding: ngram drafts tokens from each request's own prompt and "
            "output (prompt lookup), verified in the batch", default_text="off"),
    _s("--num-speculative-tokens", target="engine.num_speculative_tokens", type=int,
       metavar="K", help="with --speculative: tokens drafted and verified per step"),
    _s("--ngram-max", target="engine.ngram_max", type=int,
       help="with --speculative ngram: the longest match tried"),
    _s("--ngram-min", target="engine.ngram_min", type=int,
       help="with --speculative ngram: the shortest match tried"),
    _s("--speculative-max-batch", target="engine.speculative_max_batch", type=int, metavar="N",
       help="with --speculative: nobody drafts while more than N requests run (a verify step "
            "computes K+1 rows per request; past some batch it costs more than it saves)"),
    # -- multi-host (jax.distributed; docs/multi-host.md) ----------------------------------
    _s("--coordinator-address", target="distributed.coordinator_address", metavar="HOST:PORT",
       env="JAXGEN_COORDINATOR_ADDRESS",
       help="process 0's address for jax.distributed (every process gives the same); with "
            "--num-processes N > 1, the processes join one group and --mesh spans their devices",
       default_text="none (one process)"),
    _s("--num-processes", target="distributed.num_processes", type=int, metavar="N",
       env="JAXGEN_NUM_PROCESSES", help="processes in the group, each running the same command",
       default_text="1, or detected with --distributed auto"),
    _s("--process-id", target="distributed.process_id", type=int, metavar="I",
       env="JAXGEN_PROCESS_ID",
       help="this process's rank: 0 serves and decides, the others execute its plans",
       default_text="0, or detected with --distributed auto"),
    _s("--distributed", target="distributed.mode", choices=DISTRIBUTED_MODES,
       env="JAXGEN_DISTRIBUTED",
       help="manual: the group the three flags above describe; auto: JAX detects a TPU pod or "
            "cluster (the flags given override what it detects)"),
    _s("--peer-timeout", target="distributed.peer_timeout_s", type=float, metavar="SECONDS",
       env="JAXGEN_PEER_TIMEOUT",
       help="a process silent or behind this long is lost: every process stops, non-zero"),
    # -- server ---------------------------------------------------------------------------
    _s("--host", target="server.host", commands=SERVE, help="address to listen on"),
    _s("--port", target="server.port", type=int, commands=SERVE,
       help="gRPC port (0: any free port, printed)"),
    _s("--http", target="server.http", type=bool, commands=SERVE,
       help="serve the OpenAI-compatible HTTP API beside gRPC (--no-http: gRPC only)"),
    _s("--http-port", target="server.http_port", type=int, commands=SERVE,
       help="HTTP port of the OpenAI API (0: any free port, printed)"),
    _s("--http-host", target="server.http_host", commands=SERVE,
       help="address of the HTTP API", default_text="--host"),
    _s("--api-key", target="server.api_keys", type=list, commands=SERVE, metavar="KEY",
       env=API_KEY_ENV, help=f"accept `authorization: Bearer KEY` (repeatable; also "
                             f"${API_KEY_ENV}, comma-separated); with any key set, calls "
                             f"without one are refused (health stays open)", default_text="none"),
    _s("--api-keys-file", target="api_keys_file", commands=SERVE, metavar="FILE",
       help="more API keys, one per line", default_text="none"),
    _s("--tls-cert", target="server.tls_cert", commands=SERVE, metavar="PEM",
       help="serve TLS with this certificate chain", default_text="plaintext"),
    _s("--tls-key", target="server.tls_key", commands=SERVE, metavar="PEM",
       help="... and this private key", default_text="none"),
    _s("--max-message-bytes", target="server.max_message_bytes", type=int, commands=SERVE,
       help="largest gRPC request or response message"),
    _s("--drain-timeout", target="server.drain_timeout_s", type=float, commands=SERVE,
       metavar="SECONDS", help="on SIGTERM, how long in-flight requests may take to finish"),
    _s("--metrics-port", target="server.metrics_port", type=int, commands=SERVE, metavar="PORT",
       help="serve Prometheus /metrics on --host:PORT (0: any free port, printed)",
       default_text="off"),
    _s("--profiler-port", target="server.profiler_port", type=int, commands=SERVE, metavar="PORT",
       help="start JAX's profiler server here (TensorBoard / XProf capture)",
       default_text="off"),
    _s("--profile-dir", target="server.profile_dir", commands=SERVE, metavar="DIR",
       help="where traces captured by `jaxgen profile` are written on the server"),
    _s("--engine-process", target="server.engine_process", type=bool, commands=SERVE,
       help="run the engine in a process of its own, so the front end and the engine loop never "
            "wait on one GIL (--no-engine-process: on a thread of the server)"),
    _s("--max-engine-restarts", target="server.max_engine_restarts", type=int, commands=SERVE,
       metavar="N", help=f"restarts of a failed engine process within {RESTART_WINDOW_S:g}s; "
                         f"one more failure and the server stays NOT_SERVING, drains and exits "
                         f"non-zero (0: never restart)"),
    _s("--stream-stall-timeout", target="server.stream_stall_timeout_s", type=float,
       commands=SERVE, metavar="SECONDS",
       help="a stream whose client reads nothing for this long, with output waiting, is ended "
            "and its request aborted"),
    _s("--stream-buffer-tokens", target="server.stream_buffer_tokens", type=int, commands=SERVE,
       metavar="N", help="a stream holding more unsent tokens than this (its client not "
                         "reading) is ended and its request aborted"),
    _s("--prefix-cache-scope", target="server.prefix_cache_scope", choices=PREFIX_CACHE_SCOPES,
       commands=SERVE, help="who shares prefix-cache pages: everyone (global), callers of the "
                            "same API key (key), or nobody beyond one request's choices "
                            "(request); a request's cache_salt narrows it further",
       default_text="key with API keys set, else global"),
    _s("--log-level", target="server.log_level", choices=LOG_LEVELS, commands=SERVE,
       help="jaxgen log level (INFO: a startup summary and one line per finished request)"),
    _s("--log-prompts", target="server.log_prompts", type=bool, commands=SERVE,
       help="include prompt text in the per-request log lines"),
)
_BY_DEST = {s.dest: s for s in SETTINGS}
_SECTIONS = {"model": ModelSource, "engine": EngineConfig, "server": ServerConfig,
             "distributed": DistributedConfig}


def _default_text(setting: Setting) -> str:
    if setting.default_text is not None:
        return setting.default_text
    section, _, field = setting.target.partition(".")
    value = getattr(_SECTIONS[section](), field)
    if setting.type is bool:
        return "on" if value else "off"
    return str(value)


def add_settings(parser: argparse.ArgumentParser, command: str, preset: bool = True) -> None:
    """Adds the flags of `command`'s settings (and --config FILE) to `parser`."""
    if preset:
        parser.add_argument("--config", default=None, metavar="FILE",
                            help="a preset of these settings (YAML or JSON, keys as the flag "
                                 "names, e.g. configs/serving/cpu-small.json); flags win")
    for s in SETTINGS:
        if command not in s.commands:
            continue
        kw = dict(dest=s.dest, default=argparse.SUPPRESS,
                  help=f"{s.help} (default: {_default_text(s)})")
        if s.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif s.type is list:
            kw.update(action="append", metavar=s.metavar)
        else:
            kw.update(type=s.type, choices=s.choices, metavar=s.metavar)
        parser.add_argument(*s.flags, **kw)


def read_preset(path: str) -> dict:
    """A preset file's values by setting dest, checked against the settings' names and types.
    Keys are flag names with or without dashes (`num-pages`, `--num-pages`, `num_pages`)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"config={path}: {e.strerror or e}") from None
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping (a JSON object or YAML mapping) of setting "
                         "names to values")
    values = {}
    for key, value in data.items():
        setting = _BY_DEST.get(str(key).lstrip("-").replace("-", "_"))
        if setting is None:
            known = ", ".join(sorted(s.name for s in SETTINGS))
            raise ValueError(f"{path}: unknown setting {key!r}; known: {known}")
        want = setting.type
        numeric = (int, float) if want is float else want
        ok = isinstance(value, numeric) and not (isinstance(value, bool) and want is not bool)
        if want is list:
            ok = ok and all(isinstance(v, str) for v in value)
        if setting.choices and ok and value not in setting.choices:
            raise ValueError(f"{path}: {key}={value!r}: must be one of {', '.join(setting.choices)}")
        if not (ok or value is None):
            raise ValueError(f"{path}: {key}={value!r}: expected {want.__name__}")
        values[setting.dest] = value
    return values


def parse_mesh(spec: str) -> tuple[int, int]:
    try:
        shape = tuple(int(p) for p in str(spec).replace("x", ",").split(","))
    except ValueError:
        raise ConfigError("mesh", spec, "must look like DATA,MODEL, e.g. 1,8") from None
    if len(shape) != 2 or min(shape) < 1:
        raise ConfigError("mesh", spec, "must be two positive sizes (data, model)")
    return shape


def read_api_keys(keys, keys_file: str | None, environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """Keys given as flags, plus one per line of `keys_file` (blank lines and # comments
    skipped), plus $JAXGEN_API_KEY and the older $JAXGEN_API_KEYS (comma-separated);
    duplicates dropped, order kept."""
    found = list(keys or ())
    if keys_file:
        with open(keys_file, encoding="utf-8") as f:
            found += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    for name in (API_KEY_ENV, OLD_API_KEYS_ENV):
        found += [k.strip() for k in environ.get(name, "").split(",") if k.strip()]
    return tuple(dict.fromkeys(found))


def config_from_args(args: argparse.Namespace, command: str,
                     environ: Mapping[str, str] = os.environ) -> Config:
    """The deployment config of a parsed command line: each setting from its flag, else its
    environment variable, else the preset (`--config`), else its default."""
    given = {s.dest: getattr(args, s.dest) for s in SETTINGS if hasattr(args, s.dest)}
    preset = read_preset(args.config) if getattr(args, "config", None) else {}
    values = {}
    for s in SETTINGS:
        if command not in s.commands:
            continue
        if s.dest in given:
            values[s.dest] = given[s.dest]
        elif s.env and s.type is not list and environ.get(s.env):
            values[s.dest] = _from_env(s, environ[s.env])
        elif s.dest in preset:
            values[s.dest] = preset[s.dest]
    try:
        return _build(values, command, environ)
    except ConfigError as e:  # name the setting as the user wrote it
        raise ConfigError(setting_name(e.field), e.value, e.rule) from None


def _from_env(setting: Setting, text: str):
    """An environment variable's value as the setting's type (flags get theirs from argparse)."""
    if setting.type in (int, float):
        try:
            return setting.type(text)
        except ValueError:
            raise ConfigError(setting.env, text, f"must be {setting.type.__name__} "
                                                 f"(as {setting.flags[0]})") from None
    if setting.choices and text not in setting.choices:
        raise ConfigError(setting.env, text, f"must be one of {', '.join(setting.choices)}")
    return text


def setting_name(field: str) -> str:
    for s in SETTINGS:
        if s.target.rpartition(".")[2] == field:
            return s.name
    return field


def _build(values: dict, command: str, environ: Mapping[str, str]) -> Config:
    sections: dict[str, dict] = {name: {} for name in _SECTIONS}
    top: dict = {}
    for dest, value in values.items():
        section, _, field = _BY_DEST[dest].target.rpartition(".")
        (sections[section] if section else top)[field] = value
    if "mesh" in top:
        top["mesh"] = parse_mesh(top["mesh"])
    tp, dp = top.pop("tensor_parallel", None), top.pop("data_parallel", None)
    if tp is not None or dp is not None:
        shape = (dp or 1, tp or 1)
        if "mesh" in top and top["mesh"] != shape:
            raise ConfigError("mesh", ",".join(map(str, top["mesh"])),
                              f"disagrees with --data-parallel-size / --tensor-parallel-size "
                              f"({shape[0]},{shape[1]})")
        top["mesh"] = shape
    keys_file = top.pop("api_keys_file", None)
    if command in SERVE:
        sections["server"]["api_keys"] = read_api_keys(sections["server"].get("api_keys"),
                                                       keys_file, environ)
        sections["engine"]["warmup"] = True
    elif command == "generate":
        sections["engine"].setdefault("warmup", False)  # one-shot: compile only what runs
    config = Config(model=ModelSource(**sections["model"]), engine=EngineConfig(**sections["engine"]),
                    server=ServerConfig(**sections["server"]),
                    distributed=DistributedConfig(**sections["distributed"]), **top)
    for path in (config.server.tls_cert, config.server.tls_key):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
    return config
