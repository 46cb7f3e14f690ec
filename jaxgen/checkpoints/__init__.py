"""Checkpoint loading: bundled names, GGUF files, HF safetensors directories and jaxgen's
Orbax format, all into a `Model`, its params (placed on a mesh) and its tokenizer.

Bundled models are converted once into the cache directory and restored from there afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time

from jaxgen.checkpoints import gguf_file, hf_safetensors, orbax_format
from jaxgen.checkpoints.errors import CheckpointError, one_line
from jaxgen.checkpoints.hf_layout import load_params
from jaxgen.checkpoints.registry import BUNDLED, CACHE_ENV, DEFAULT_MODEL, bundled, cache_dir
from jaxgen.models import Model

log = logging.getLogger(__name__)

__all__ = ["BUNDLED", "CACHE_ENV", "DEFAULT_MODEL", "CheckpointError", "LoadedModel", "convert",
           "ensure_converted", "load"]


@dataclasses.dataclass
class LoadedModel:
    model: Model
    params: dict
    tokenizer: object
    source: str  # what was actually read: a GGUF, an HF dir, or a jaxgen checkpoint dir
    load_seconds: float
    converted: bool = False  # True when this load first converted a bundled model into the cache

    @property
    def config(self):
        return self.model.config


def _load_source(path: str, dtype: str, mesh, attn_backend: str, embed_layout: str):
    """(model, params, tokenizer) from a GGUF file, HF dir or jaxgen dir."""
    from jaxgen import tokenizer as tok

    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise CheckpointError(f"{path}: a model file must be a .gguf")
        reader = gguf_file.open_gguf(path)
        model = Model(gguf_file.config_from_gguf(reader, path, dtype), attn_backend, embed_layout)
        get, names = gguf_file.tensor_reader(reader, model.config, path)
        params = load_params(model, get, path, names, mesh)
        return model, params, tok.tokenizer_from_gguf(reader)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if orbax_format.is_jaxgen_checkpoint(path):
        model = Model(orbax_format.read_config(path, dtype), attn_backend, embed_layout)
        params = orbax_format.restore(path, model, mesh)
        return model, params, tok.load_tokenizer(os.path.join(path, "tokenizer"))
    if hf_safetensors.is_hf_checkpoint(path):
        cfg = hf_safetensors.config_from_hf(hf_safetensors.read_config(path), path, dtype)
        model = Model(cfg, attn_backend, embed_layout)
        get, names = hf_safetensors.tensor_reader(path)
        params = load_params(model, get, path, names, mesh)
        return model, params, tok.load_hf_tokenizer(path)
    raise CheckpointError(
        f"{path}: not a model directory: expected {orbax_format.CONFIG_FILE} (jaxgen checkpoint) "
        "or config.json with *.safetensors (HF checkpoint)")


def load(name_or_path: str = DEFAULT_MODEL, *, dtype: str = "float32", mesh=None,
         cache: str | None = None, attn_backend: str = "auto",
         embed_layout: str = "auto", convert_bundled: bool = True) -> LoadedModel:
    """Loads a bundled model by name, or a checkpoint by path, onto `mesh` (None: one device);
    `embed_layout` as `Model`'s. `convert_bundled=False`: a bundled model not converted yet is
    read from its GGUF instead (a process of a multi-process group: an Orbax save there would be
    a collective act of the group, and its processes may share one cache directory)."""
    start = time.perf_counter()
    entry = bundled(name_or_path)
    converted = False
    if entry is not None:
        path = os.path.join(cache_dir(cache), "models", entry.name)
        current = orbax_format.format_version(path) == orbax_format.FORMAT_VERSION
        if not current and not convert_bundled:
            path = entry.locate_gguf()
        elif not current:
            converted = _convert_bundled(entry, path)
    elif os.path.exists(name_or_path):
        path = name_or_path
    else:
        raise CheckpointError(
            f"model {name_or_path!r}: not a bundled model ({', '.join(sorted(BUNDLED))}) "
            "and no such file or directory")
    model, params, tokenizer = _read(path, dtype, mesh, attn_backend, embed_layout)
    return LoadedModel(model, params, tokenizer, path, time.perf_counter() - start, converted)


def ensure_converted(name: str, cache: str | None = None) -> str:
    """The folder of bundled model `name` in the cache, converted first if it is not there yet
    (or is in an older format)."""
    entry = bundled(name)
    if entry is None:
        raise CheckpointError(f"model {name!r}: not a bundled model ({', '.join(sorted(BUNDLED))})")
    path = os.path.join(cache_dir(cache), "models", entry.name)
    if orbax_format.format_version(path) != orbax_format.FORMAT_VERSION:
        _convert_bundled(entry, path)
    return path


def _convert_bundled(entry, path: str) -> bool:
    """Converts `entry` into `path` unless another process did while this one waited for the
    lock; whether this one did."""
    with _converting(path):
        if orbax_format.format_version(path) == orbax_format.FORMAT_VERSION:
            return False
        log.info("converting %s into %s (first use of this jaxgen's format)", entry.name, path)
        convert(entry.locate_gguf(), path)
        return True


CONVERT_LOCK_TIMEOUT_S = 1800.0


@contextlib.contextmanager
def _converting(path: str, timeout_s: float = CONVERT_LOCK_TIMEOUT_S):
    """Holds `path`.lock while this process converts into `path`: two servers starting at once
    on one cache would otherwise write the same `.partial` folder, each removing the other's.
    An flock (filelock's on Linux): it goes with the process, however that ends."""
    import filelock

    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with filelock.FileLock(path + ".lock", timeout=timeout_s):
            yield
    except filelock.Timeout:
        raise CheckpointError(f"{path}: another process has been converting this model for over "
                              f"{timeout_s:g}s (it holds {path}.lock); is it stuck?") from None


def _read(path: str, dtype: str, mesh, attn_backend: str, embed_layout: str):
    """`_load_source`, with any failure one `CheckpointError` naming the checkpoint: a damaged
    file can trip any parser on the way (metadata, tokenizer, config checks), and a user should
    see one line saying which file, not a traceback from deep inside one of them."""
    try:
        return _load_source(path, dtype, mesh, attn_backend, embed_layout)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load this checkpoint (damaged or unsupported?): "
                              f"{type(e).__name__}: {one_line(e)}") from e


def convert(src: str, dst: str, dtype: str = "float32") -> None:
    """Writes `src` (bundled name, GGUF, HF dir, jaxgen dir) as a jaxgen checkpoint at `dst`."""
    entry = bundled(src)
    path = entry.locate_gguf() if entry is not None else src
    model, params, tokenizer = _read(path, dtype, None, "auto", "vocab_major")
    orbax_format.save(dst, model.config, model.canonical_params(params), tokenizer)
