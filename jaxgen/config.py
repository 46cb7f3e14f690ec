"""The deployment config: what to load, how the engine runs, and how the server listens.

One frozen `Config` of frozen sections (`ModelSource`, `EngineConfig`, `ServerConfig`), each
validated on construction: a bad value raises `ConfigError` naming the field, the value and the
limit. It is built at the edge (`jaxgen.config_sources`: flags, a preset file, the environment)
and handed, whole, to `jaxgen.build.build_engine` by every entry point and process. Values the
runner and the scheduler share live once, in `EngineConfig`; their derived shapes (pages per
sequence, prefill buckets) are computed here too.

Standard library only: the server process, the engine process and the CLI's parser import this
module without loading jax.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile

DEFAULT_MODEL = "gemma3-270m"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_HTTP_PORT = 8000
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DEFAULT_PROFILE_DIR = os.path.join(tempfile.gettempdir(), "jaxgen-profiles")
DEFAULT_MAX_MODEL_LEN = 4096  # when the model allows more and none is asked for
STEP_TIMEOUT_FLOOR_S = 60.0  # the step watchdog's default: at least this ...
STEP_TIMEOUT_WARMUP_FACTOR = 20.0  # ... and this many times the slowest warm-up call
# The engine process sends at least this often (`engine_messages`); the server's side of the
# step watchdog takes silence for a hang, so its limit must span several heartbeats.
ENGINE_HEARTBEAT_S = 1.0
MIN_PROCESS_STEP_TIMEOUT_S = 5 * ENGINE_HEARTBEAT_S
RESTART_WINDOW_S = 600.0  # --max-engine-restarts counts the restarts within this window
DTYPES = ("auto", "float32", "bfloat16")
PREFIX_CACHE_SCOPES = ("global", "key", "request")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """A setting out of its limits: `field=value: rule`."""

    def __init__(self, field: str, value, rule: str):
        super().__init__(f"{field}={value!r}: {rule}")
        self.field, self.value, self.rule = field, value, rule


class GroupError(ValueError):
    """The processes of a multi-process deployment cannot form one group as started (started
    unlike each other, a process that never came): a setting error, reported on every process."""


def _bad(field, value, rule):
    raise ConfigError(field, value, rule)


def _int_at_least(obj, names, low: int) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            _bad(name, value, f"must be an integer >= {low}")


def _port(field, value, low: int = 0) -> None:
    if value is not None and (not isinstance(value, int) or not low <= value <= 65535):
        _bad(field, value, f"must be in [{low}, 65535]")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Which checkpoint, in which dtype, under which name."""

    model: str = DEFAULT_MODEL  # bundled name, .gguf file, HF dir or jaxgen checkpoint dir
    dtype: str = "auto"  # auto: bfloat16 on GPU and TPU, float32 on CPU
    cache_dir: str | None = None  # bundled models' conversions; None: $JAXGEN_CACHE_DIR or ~/.cache/jaxgen
    served_model_name: str | None = None  # None: `model` as given

    def __post_init__(self):
        if not self.model:
            _bad("model", self.model, "must name a bundled model or a checkpoint path")
        if self.dtype not in DTYPES:
            _bad("dtype", self.dtype, f"must be one of {', '.join(DTYPES)}")
        if self.served_model_name is not None and not self.served_model_name.strip():
            _bad("served_model_name", self.served_model_name, "must not be empty")

    @property
    def name(self) -> str:
        """The name clients use for this model (OpenAI's `model` field, logs, metrics)."""
        return self.served_model_name or self.model


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The engine's sizes and switches; the scheduler's and the runner's settings derive from
    these (`jaxgen.scheduler.config.scheduler_config`, `ModelRunner`)."""

    num_slots: int = 8  # decode batch rows: requests running at once
    page_size: int = 16  # tokens per KV page, a multiple of 16
    max_model_len: int | None = None  # prompt + completion; None: min(model context, 4096)
    decode_steps: int = 8  # tokens each slot advances per device call (on-device loop)
    max_prefill_tokens: int = 512  # prompt tokens per step (largest prefill bucket)
    num_pages: int | None = None  # KV pool, null page included; None: sized from free memory
    # Share of free memory for the KV pool when num_pages is None. None: 0.5 on GPU and TPU,
    # and on CPU a fixed pool of DEFAULT_CPU_PAGES (a share of host RAM would take gigabytes
    # of zeros for a test server).
    memory_utilization: float | None = None
    max_waiting: int = 1024  # waiting-queue bound: past it add_request raises QueueFullError
    # Seconds a request may wait before it is first scheduled; past it, it is shed (None: no limit).
    max_queue_time_s: float | None = None
    # A device step running longer marks the engine hung (a watchdog). None: the larger of
    # STEP_TIMEOUT_FLOOR_S and STEP_TIMEOUT_WARMUP_FACTOR x the slowest warm-up call; 0: off.
    step_timeout_s: float | None = None
    enable_prefix_cache: bool = True
    warmup: bool = True  # compile every shape at start
    # Dispatch steps from a launcher thread, so the host's update and text of one step overlap
    # the dispatch of the next (docs/benchmarks.md: no gain measured on the GPU so far).
    overlap_launch: bool = False
    # Speculative decoding: "ngram" (prompt lookup) drafts K tokens per step from each
    # request's own tokens, verified in the batch; None: off.
    speculative: str | None = None
    num_speculative_tokens: int = 4
    ngram_max: int = 4  # match lengths tried, longest first
    ngram_min: int = 2
    speculative_max_batch: int = 4  # nobody drafts while more requests run

    def __post_init__(self):
        _int_at_least(self, ("num_slots", "decode_steps", "max_prefill_tokens", "max_waiting",
                             "num_speculative_tokens", "ngram_min", "speculative_max_batch"), 1)
        if self.speculative not in (None, "ngram"):
            _bad("speculative", self.speculative, "must be 'ngram' (or unset: off)")
        if not isinstance(self.ngram_max, int) or self.ngram_max < self.ngram_min:
            _bad("ngram_max", self.ngram_max, f"must be an integer >= ngram_min={self.ngram_min}")
        if not isinstance(self.page_size, int) or self.page_size < 16 or self.page_size % 16:
            _bad("page_size", self.page_size, "must be a positive multiple of 16")
        if self.max_model_len is not None:
            _int_at_least(self, ("max_model_len",), 2)
        if self.num_pages is not None:
            _int_at_least(self, ("num_pages",), 2)
        if self.memory_utilization is not None and not 0 < self.memory_utilization <= 1:
            _bad("memory_utilization", self.memory_utilization, "must be in (0, 1]")
        if self.max_queue_time_s is not None and not self.max_queue_time_s > 0:
            _bad("max_queue_time_s", self.max_queue_time_s, "must be > 0 (unset: no limit)")
        if self.step_timeout_s is not None and not self.step_timeout_s >= 0:
            _bad("step_timeout_s", self.step_timeout_s, "must be >= 0 (0: no watchdog)")

    def step_timeout(self, slowest_warmup_s: float | None) -> float | None:
        """The step watchdog's limit in seconds (None: off): as set, else the generous default
        from the slowest warm-up call (compilation included, so never tight)."""
        if self.step_timeout_s is not None:
            return self.step_timeout_s or None
        return max(STEP_TIMEOUT_FLOOR_S, STEP_TIMEOUT_WARMUP_FACTOR * (slowest_warmup_s or 0.0))

    def resolved(self, model_context: int) -> "EngineConfig":
        """With `max_model_len` set: as asked (at most the model's context), else
        min(model context, DEFAULT_MAX_MODEL_LEN)."""
        if self.max_model_len is None:
            return dataclasses.replace(self, max_model_len=min(model_context, DEFAULT_MAX_MODEL_LEN))
        if self.max_model_len > model_context:
            _bad("max_model_len", self.max_model_len,
                 f"exceeds the model's context of {model_context} positions")
        return self

    @property
    def pages_per_seq(self) -> int:
        """Page-table row length: max_model_len plus room for the decode writes past a
        request's last kept token (they land in the null page)."""
        return math.ceil((self._max_len + self.decode_steps) / self.page_size)

    @property
    def num_drafts(self) -> int:
        """Draft tokens a drafting request verifies per step: `num_speculative_tokens` with
        speculative decoding, else 0 (no verify program)."""
        return self.num_speculative_tokens if self.speculative else 0

    @property
    def prefill_buckets(self) -> tuple[int, ...]:
        """Token counts a prefill call is padded to: 16, 32, ... below max_prefill_tokens, and it."""
        buckets, size = [], 16
        while size < self.max_prefill_tokens:
            buckets.append(size)
            size *= 2
        return tuple(buckets) + (self.max_prefill_tokens,)

    @property
    def _max_len(self) -> int:
        if self.max_model_len is None:
            raise ValueError("max_model_len is not resolved yet (EngineConfig.resolved)")
        return self.max_model_len


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Where and how `jaxgen serve` listens, and what it does around the engine."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT  # gRPC; 0: any free port (the one bound is printed)
    http: bool = True  # the OpenAI-compatible HTTP API beside gRPC
    http_port: int = DEFAULT_HTTP_PORT  # 0: any free port (printed)
    http_host: str | None = None  # None: `host`
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    tls_cert: str | None = None  # PEM certificate chain file; with tls_key, serve TLS only
    tls_key: str | None = None  # PEM private key file
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # per gRPC message, each direction
    drain_timeout_s: float = 30.0  # SIGTERM: in-flight requests get this long to finish
    metrics_port: int | None = None  # Prometheus /metrics over HTTP on host:port; 0: any port
    profiler_port: int | None = None  # JAX's profiler server (TensorBoard / XProf capture)
    profile_dir: str = DEFAULT_PROFILE_DIR  # where `jaxgen profile` captures are written
    engine_process: bool = True  # the engine in a process of its own (else a thread)
    # Engine restarts (engine process only) within RESTART_WINDOW_S before the server gives up:
    # it stays NOT_SERVING and exits non-zero after draining. 0: never restart.
    max_engine_restarts: int = 5
    # A stream whose client has read nothing for this long, with output waiting, is ended and
    # its request aborted; so is one holding more than stream_buffer_tokens unsent tokens.
    stream_stall_timeout_s: float = 60.0
    stream_buffer_tokens: int = 8192
    # Who may share prefix-cache pages: everyone ("global"), callers of the same API key
    # ("key"), nobody beyond one request's choices ("request"). None: "key" with API keys set,
    # else "global".
    prefix_cache_scope: str | None = None
    log_level: str = "INFO"
    log_prompts: bool = False  # prompt text in the per-request log lines

    def __post_init__(self):
        if not self.host:
            _bad("host", self.host, "must not be empty")
        _port("port", self.port)
        _port("http_port", self.http_port)
        if self.http and self.http_port == self.port != 0:
            _bad("http_port", self.http_port, "must differ from port")
        for key in self.api_keys:
            if not key or any(c.isspace() for c in key):
                _bad("api_keys", "<hidden>", "each key must be non-empty, without whitespace")
        if (self.tls_cert is None) != (self.tls_key is None):
            _bad("tls_cert" if self.tls_cert is None else "tls_key", None,
                 "TLS needs both a certificate and a key")
        if not isinstance(self.max_message_bytes, int) or self.max_message_bytes < 1024:
            _bad("max_message_bytes", self.max_message_bytes, "must be an integer >= 1024")
        if not self.drain_timeout_s >= 0:
            _bad("drain_timeout_s", self.drain_timeout_s, "must be >= 0")
        _port("metrics_port", self.metrics_port)
        _port("profiler_port", self.profiler_port, low=1)
        if self.metrics_port is not None and self.metrics_port == self.port != 0:
            _bad("metrics_port", self.metrics_port, "must differ from port")
        if self.log_level not in LOG_LEVELS:
            _bad("log_level", self.log_level, f"must be one of {', '.join(LOG_LEVELS)}")
        _int_at_least(self, ("max_engine_restarts",), 0)
        _int_at_least(self, ("stream_buffer_tokens",), 1)
        if not self.stream_stall_timeout_s > 0:
            _bad("stream_stall_timeout_s", self.stream_stall_timeout_s, "must be > 0")
        if self.prefix_cache_scope is not None:
            if self.prefix_cache_scope not in PREFIX_CACHE_SCOPES:
                _bad("prefix_cache_scope", self.prefix_cache_scope,
                     f"must be one of {', '.join(PREFIX_CACHE_SCOPES)}")
            if self.prefix_cache_scope == "key" and not self.api_keys:
                _bad("prefix_cache_scope", self.prefix_cache_scope,
                     "needs API keys (--api-key): the key is what separates tenants")

    @property
    def cache_scope(self) -> str:
        """prefix_cache_scope, resolved: "key" with API keys set, else "global"."""
        return self.prefix_cache_scope or ("key" if self.api_keys else "global")

    @property
    def address(self) -> str:
        return grpc_target(self.host, self.port)

    @property
    def http_address(self) -> str:
        return self.http_host or self.host


DISTRIBUTED_MODES = ("manual", "auto")
DEFAULT_PEER_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How the processes of one deployment join into one group (`jax.distributed`): one model
    over the devices of every process, process 0 deciding and the others executing
    (docs/multi-host.md). The field names are `jax.distributed.initialize`'s own.

    "manual": the group is what coordinator_address / num_processes / process_id say (a single
    process when num_processes is 1); "auto": JAX detects a TPU pod or cluster environment and
    the values given here override what it detects."""

    mode: str = "manual"
    coordinator_address: str | None = None  # HOST:PORT of process 0's coordination service
    num_processes: int | None = None  # None: 1, or detected ("auto")
    process_id: int | None = None  # None: 0 for a single process, or detected ("auto")
    # A peer silent (no heartbeat) or behind (a plan not run) this long is lost: the group stops.
    peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S

    def __post_init__(self):
        if self.mode not in DISTRIBUTED_MODES:
            _bad("distributed", self.mode, f"must be one of {', '.join(DISTRIBUTED_MODES)}")
        if self.num_processes is not None:
            _int_at_least(self, ("num_processes",), 1)
        if self.process_id is not None:
            _int_at_least(self, ("process_id",), 0)
            if self.num_processes is not None and self.process_id >= self.num_processes:
                _bad("process_id", self.process_id,
                     f"must be below num_processes={self.num_processes}")
        if self.coordinator_address is not None:
            host, sep, port = self.coordinator_address.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
                _bad("coordinator_address", self.coordinator_address,
                     "must be HOST:PORT with a port in [1, 65535]")
        if not (isinstance(self.peer_timeout_s, (int, float)) and self.peer_timeout_s >= 1):
            _bad("peer_timeout_s", self.peer_timeout_s, "must be >= 1 (seconds)")
        if self.mode == "manual" and (self.num_processes or 1) > 1:
            for name in ("coordinator_address", "process_id"):
                if getattr(self, name) is None:
                    _bad(name, None, f"must be given with num_processes={self.num_processes} "
                                     "(or use distributed=auto)")

    @property
    def enabled(self) -> bool:
        """Whether this process joins a group of several (or lets JAX detect one)."""
        return self.mode == "auto" or (self.num_processes or 1) > 1


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything one deployment needs, from flags, a preset file and the environment."""

    model: ModelSource = ModelSource()
    engine: EngineConfig = EngineConfig()
    server: ServerConfig = ServerConfig()
    distributed: DistributedConfig = DistributedConfig()
    mesh: tuple[int, int] | None = None  # (data, model); None: one device
    compilation_cache_dir: str | None = None  # None: $JAXGEN_COMPILATION_CACHE_DIR or ~/.cache/jaxgen/xla; "off"

    def __post_init__(self):
        if self.mesh is not None and (len(self.mesh) != 2 or any(
                not isinstance(n, int) or n < 1 for n in self.mesh)):
            _bad("mesh", self.mesh, "must be two positive sizes (data, model)")
        timeout = self.engine.step_timeout_s
        if self.server.engine_process and timeout and timeout < MIN_PROCESS_STEP_TIMEOUT_S:
            _bad("step_timeout_s", timeout,
                 f"must be 0 (off) or >= {MIN_PROCESS_STEP_TIMEOUT_S:g}s with the engine in its "
                 f"own process: it sends a heartbeat every {ENGINE_HEARTBEAT_S:g}s, and a "
                 f"shorter silence is no sign of a hang")


def grpc_target(host: str, port: int) -> str:
    """"host:port" as gRPC wants it (IPv6 literals in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
