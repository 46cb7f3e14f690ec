"""jaxgen's native checkpoint: a directory with `model_config.json`, `params/` (Orbax) and
`tokenizer/`.

Params are saved as a flat dict keyed by dotted paths ("layers.3.attn.q"), which keeps the
format independent of Flax's internal tree types, and restored straight into the target
shardings (each host reads only what its devices hold) and dtype.
"""

from __future__ import annotations

import json
import os
import shutil

import jax

from jaxgen.checkpoints.errors import CheckpointError, one_line
from jaxgen.models import Model, ModelConfig
from jaxgen.models.base import transposed_sharding

# 2: fused `attn.qkv` and `mlp.gate_up` weights (1 had separate q/k/v and gate/up).
FORMAT_VERSION = 2
CONFIG_FILE = "model_config.json"


def is_jaxgen_checkpoint(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, CONFIG_FILE))


def format_version(directory: str) -> int | None:
    """The checkpoint's `format_version`, or None if its config is missing or unreadable."""
    try:
        with open(os.path.join(directory, CONFIG_FILE)) as f:
            return json.load(f).get("format_version")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def flatten(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def unflatten(flat: dict, like) -> dict:
    """Inverse of `flatten`, restoring the key types (int layer indices) of `like`."""
    def build(node, prefix):
        return {k: build(v, f"{prefix}{k}.") if isinstance(v, dict) else flat[f"{prefix}{k}"]
                for k, v in node.items()}
    return build(like, "")


def save(directory: str, config: ModelConfig, params, tokenizer=None) -> None:
    """Writes a checkpoint atomically: into `directory.partial`, then renamed. `params` in
    checkpoint order (`Model.canonical_params`: the embedding table `[vocab, embed]`)."""
    table = params["embed"]
    if tuple(table.shape) != (config.vocab_size, config.hidden_size):
        raise ValueError(f"params['embed'] has shape {tuple(table.shape)}, expected "
                         f"{(config.vocab_size, config.hidden_size)} (vocab, embed): pass "
                         "Model.canonical_params(params)")
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    partial = directory + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(partial, "params"), flatten(params))
    checkpointer.wait_until_finished()
    if tokenizer is not None:
        tokenizer.save(os.path.join(partial, "tokenizer"))
    with open(os.path.join(partial, CONFIG_FILE), "w") as f:
        json.dump({"format_version": FORMAT_VERSION, "model": config.to_dict()}, f, indent=2)
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.rename(partial, directory)


def read_config(directory: str, dtype: str | None = None) -> ModelConfig:
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: format_version={data.get('format_version')!r}, "
                                  f"this jaxgen reads {FORMAT_VERSION}; convert the source "
                                  "checkpoint again (`jaxgen convert`)")
        config = ModelConfig.from_dict(data["model"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: unreadable jaxgen model config: {e}") from None
    return config.replace(dtype=dtype) if dtype else config


def restore(directory: str, model: Model, mesh=None):
    """Params of `model` from `directory/params`, in `model.config.dtype`, placed per `mesh`."""
    import orbax.checkpoint as ocp

    abstract = model.abstract_params
    shardings = model.param_shardings(mesh) if mesh is not None else jax.tree.map(
        lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
    if model.embed_major:  # stored vocab-major: restore that, then transpose
        table = abstract["embed"]
        abstract = {**abstract, "embed": jax.ShapeDtypeStruct(table.shape[::-1], table.dtype)}
        shardings = {**shardings, "embed": transposed_sharding(shardings["embed"])}
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    path = os.path.join(os.path.abspath(directory), "params")
    if not os.path.isdir(path):
        raise CheckpointError(f"{directory}: no params/ directory (incomplete jaxgen checkpoint)")
    try:
        flat = ocp.StandardCheckpointer().restore(path, flatten(target))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot restore params: {type(e).__name__}: "
                              f"{one_line(e)}") from None
    return model.from_canonical(unflatten(flat, abstract))
