"""HF naming -> jaxgen parameter tree.

Every importer (HF safetensors, GGUF) first names its tensors as HF `transformers` does for the
architecture, then this module turns them into the nested parameter dict of `jaxgen.models.Model`:
it checks each shape, transposes `[out, in]` linears to `[in, out]`, splits heads out, fuses
Q/K/V and gate/up into the model's fused weights, casts to the config dtype and places each array
in its target sharding as it goes (one param's tensors in host memory at a time; each device,
and over several processes each process, receives only its own shards).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

from jaxgen.checkpoints.errors import CheckpointError
from jaxgen.models import Model, ModelConfig

# Our block param name -> HF name inside `model.layers.N.`, per architecture.
_BLOCK_NORMS = {
    "gemma3": {
        "pre_attn_norm": "input_layernorm",
        "post_attn_norm": "post_attention_layernorm",
        "pre_mlp_norm": "pre_feedforward_layernorm",
        "post_mlp_norm": "post_feedforward_layernorm",
    },
    "llama": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
}


def _heads_in(w: np.ndarray, heads: int) -> np.ndarray:
    """`[heads*D, E]` -> `[E, heads, D]`."""
    return w.reshape(heads, -1, w.shape[-1]).transpose(2, 0, 1)


def _heads_out(w: np.ndarray, heads: int) -> np.ndarray:
    """`[E, heads*D]` -> `[heads, D, E]`."""
    return w.reshape(w.shape[0], heads, -1).transpose(1, 2, 0)


def fuse_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, hq: int, hkv: int) -> np.ndarray:
    """HF `q_proj [Hq*D, E]`, `k_proj`, `v_proj [Hkv*D, E]` -> our `qkv [E, Hkv, G + 2, D]`:
    per KV head its G query heads (HF's query head `h*G + j` attends with KV head `h`), K, V."""
    e = q.shape[-1]
    qh = _heads_in(q, hq).reshape(e, hkv, hq // hkv, -1)
    return np.concatenate([qh, _heads_in(k, hkv)[:, :, None], _heads_in(v, hkv)[:, :, None]],
                          axis=2)


def fuse_gate_up(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """HF `gate_proj`, `up_proj [F, E]` -> our `gate_up [E, 2, F]`."""
    return np.stack([gate.T, up.T], axis=1)


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one of our params comes from: HF tensor names, their expected shapes, and the
    transform from those arrays (f32, in order) to ours."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    transform: Callable[..., np.ndarray]


def _one(name: str, shape: tuple[int, ...], transform=lambda w: w) -> Source:
    return Source((name,), (shape,), transform)


def hf_layout(cfg: ModelConfig, embed_major: bool = False) -> dict[tuple, Source]:
    """Our param path -> its `Source` in an HF-named checkpoint (`embed_major`: the model holds
    its embedding table as `[embed, vocab]`, see `Model.embed_layout`)."""
    e, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layout = {
        ("embed",): _one("model.embed_tokens.weight", (v, e),
                         np.transpose if embed_major else (lambda w: w)),
        ("final_norm", "weight"): _one("model.norm.weight", (e,)),
    }
    if cfg.architecture == "llama" and not cfg.tie_embeddings:
        layout[("lm_head",)] = _one("lm_head.weight", (v, e), np.transpose)
    for i in range(cfg.num_layers):
        hf = f"model.layers.{i}."
        ours = ("layers", i)
        attn = f"{hf}self_attn."
        layout[ours + ("attn", "qkv")] = Source(
            (f"{attn}q_proj.weight", f"{attn}k_proj.weight", f"{attn}v_proj.weight"),
            ((hq * d, e), (hkv * d, e), (hkv * d, e)),
            lambda q, k, v_: fuse_qkv(q, k, v_, hq, hkv))
        layout[ours + ("attn", "o")] = _one(f"{attn}o_proj.weight", (e, hq * d),
                                            lambda w: _heads_out(w, hq))
        if cfg.architecture == "gemma3":
            for name in ("q_norm", "k_norm"):
                layout[ours + ("attn", name, "weight")] = _one(f"{attn}{name}.weight", (d,))
        for name, hf_name in _BLOCK_NORMS[cfg.architecture].items():
            layout[ours + (name, "weight")] = _one(f"{hf}{hf_name}.weight", (e,))
        layout[ours + ("mlp", "gate_up")] = Source(
            (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"), ((f, e), (f, e)),
            fuse_gate_up)
        layout[ours + ("mlp", "down")] = _one(f"{hf}mlp.down_proj.weight", (e, f), np.transpose)
    return layout


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_params(model: Model, get_tensor: Callable[[str], np.ndarray], source: str,
                tensor_names: set[str] | None = None, mesh=None):
    """Builds `model`'s params from HF-named tensors fetched one at a time by `get_tensor`.

    `tensor_names`, when given, is what the checkpoint holds: a missing tensor is reported by
    its HF name before any loading starts.
    """
    cfg = model.config
    layout = hf_layout(cfg, model.embed_major)
    if tensor_names is not None:
        missing = [name for src in layout.values() for name in src.names
                   if name not in tensor_names]
        if missing:
            raise CheckpointError(
                f"{source}: missing {len(missing)} tensor(s) for a {cfg.architecture} model with "
                f"{cfg.num_layers} layers, e.g. {missing[:3]}")
    abstract = model.abstract_params
    shardings = model.param_shardings(mesh) if mesh is not None else None
    params: dict = {}
    for path, src in layout.items():
        arrays = []
        for name, hf_shape in zip(src.names, src.shapes):
            array = np.asarray(get_tensor(name))
            if tuple(array.shape) != hf_shape:
                raise CheckpointError(
                    f"{source}: tensor {name!r} has shape {tuple(array.shape)}, expected "
                    f"{hf_shape} for this {cfg.architecture} config")
            arrays.append(array.astype(np.float32))
        target = _get(abstract, path)
        value = np.ascontiguousarray(src.transform(*arrays)).astype(target.dtype)
        del arrays
        assert value.shape == target.shape, (path, value.shape, target.shape)
        if shardings is None:
            _set(params, path, jax.device_put(value))
        else:  # each device gets its shard only; over several processes, only this one's
            _set(params, path, jax.make_array_from_callback(
                value.shape, _get(shardings, path), lambda index, value=value: value[index]))
    return params
