"""`ServerConfig`: where and how the gRPC server listens — address, API keys, TLS, message size,
drain grace — frozen and validated on construction; plus reading API keys from a file or the
environment and serving presets (JSON files of `jaxgen serve` flag values, configs/serving/).

Knows nothing about the model or the engine: those are `jaxgen serve`'s model and engine flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

API_KEYS_ENV = "JAXGEN_API_KEYS"  # comma-separated keys the server accepts
CLIENT_API_KEY_ENV = "JAXGEN_API_KEY"  # the key `jaxgen client` sends
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DEFAULT_PROFILE_DIR = os.path.join(tempfile.gettempdir(), "jaxgen-profiles")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT  # 0: any free port (the one bound is printed)
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    tls_cert: str | None = None  # PEM certificate chain file; with tls_key, serve TLS only
    tls_key: str | None = None  # PEM private key file
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # per message, each direction
    drain_timeout_s: float = 30.0  # SIGTERM: in-flight requests get this long to finish
    metrics_port: int | None = None  # Prometheus /metrics over HTTP on host:port; 0: any port
    profiler_port: int | None = None  # JAX's profiler server (TensorBoard / XProf capture)

    def __post_init__(self):
        def bad(field, value, rule):
            raise ValueError(f"{field}={value!r}: {rule}")

        if not self.host:
            bad("host", self.host, "must not be empty")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            bad("port", self.port, "must be in [0, 65535]")
        for key in self.api_keys:
            if not key or any(c.isspace() for c in key):
                bad("api_keys", "<hidden>", "each key must be non-empty, without whitespace")
        if (self.tls_cert is None) != (self.tls_key is None):
            bad("tls_cert" if self.tls_cert is None else "tls_key", None,
                "TLS needs both a certificate and a key")
        if not isinstance(self.max_message_bytes, int) or self.max_message_bytes < 1024:
            bad("max_message_bytes", self.max_message_bytes, "must be an integer >= 1024")
        if not self.drain_timeout_s >= 0:
            bad("drain_timeout_s", self.drain_timeout_s, "must be >= 0")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            bad("metrics_port", self.metrics_port, "must be in [0, 65535]")
        if self.profiler_port is not None and not 1 <= self.profiler_port <= 65535:
            bad("profiler_port", self.profiler_port, "must be in [1, 65535]")
        if self.metrics_port is not None and self.metrics_port == self.port != 0:
            bad("metrics_port", self.metrics_port, "must differ from port")

    @property
    def address(self) -> str:
        return grpc_target(self.host, self.port)


def grpc_target(host: str, port: int) -> str:
    """"host:port" as gRPC wants it (IPv6 literals in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def read_api_keys(keys: list[str], keys_file: str | None, environ=os.environ) -> tuple[str, ...]:
    """Keys given as flags, plus one per line of `keys_file` (blank lines and # comments
    skipped), plus the comma-separated $JAXGEN_API_KEYS; duplicates dropped, order kept."""
    found = list(keys)
    if keys_file:
        with open(keys_file, encoding="utf-8") as f:
            found += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    found += [k.strip() for k in environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    return tuple(dict.fromkeys(found))


def read_preset(path: str, flags: dict[str, type]) -> dict:
    """A serving preset: a JSON object whose keys are `jaxgen serve` flag names (`--num-pages`
    as "num-pages" or "num_pages"); its values become the flags' defaults. `flags` maps each
    flag's dest to its type (int, float, str, bool, list)."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of flag names to values")
    values = {}
    for key, value in data.items():
        dest = key.lstrip("-").replace("-", "_")
        if dest not in flags or dest == "config":
            known = ", ".join(sorted(set(flags) - {"config"}))
            raise ValueError(f"{path}: unknown setting {key!r}; known: {known}")
        want = flags[dest]
        numeric = (int, float) if want is float else want
        ok = isinstance(value, numeric) and not (isinstance(value, bool) and want is not bool)
        if want is list:
            ok = ok and all(isinstance(v, str) for v in value)
        if not (ok or value is None):
            raise ValueError(f"{path}: {key}={value!r}: expected {want.__name__}")
        values[dest] = value
    return values
