"""HF naming -> jaxgen parameter tree.

Every importer (HF safetensors, GGUF) first names its tensors as HF `transformers` does for the
architecture, then this module turns them into the nested parameter dict of `jaxgen.models.Model`:
it checks each shape, transposes `[out, in]` linears to `[in, out]`, splits heads out, casts to
the config dtype and places each array in its target sharding as it goes (one tensor in host
memory at a time).
"""

from __future__ import annotations

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


def hf_layout(cfg: ModelConfig) -> dict[tuple, tuple[str, tuple[int, ...], Callable]]:
    """Our param path -> (HF tensor name, expected HF shape, HF -> ours transform)."""
    e, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    same = lambda w: w
    layout = {
        ("embed",): ("model.embed_tokens.weight", (v, e), same),
        ("final_norm", "weight"): ("model.norm.weight", (e,), same),
    }
    if cfg.architecture == "llama" and not cfg.tie_embeddings:
        layout[("lm_head",)] = ("lm_head.weight", (v, e), np.transpose)
    for i in range(cfg.num_layers):
        hf = f"model.layers.{i}."
        ours = ("layers", i)
        attn = {
            "q": ("q_proj", (hq * d, e), lambda w: _heads_in(w, hq)),
            "k": ("k_proj", (hkv * d, e), lambda w: _heads_in(w, hkv)),
            "v": ("v_proj", (hkv * d, e), lambda w: _heads_in(w, hkv)),
            "o": ("o_proj", (e, hq * d), lambda w: _heads_out(w, hq)),
        }
        for name, (hf_name, shape, fn) in attn.items():
            layout[ours + ("attn", name)] = (f"{hf}self_attn.{hf_name}.weight", shape, fn)
        if cfg.architecture == "gemma3":
            for name in ("q_norm", "k_norm"):
                layout[ours + ("attn", name, "weight")] = (f"{hf}self_attn.{name}.weight", (d,), same)
        for name, hf_name in _BLOCK_NORMS[cfg.architecture].items():
            layout[ours + (name, "weight")] = (f"{hf}{hf_name}.weight", (e,), same)
        layout[ours + ("mlp", "gate")] = (f"{hf}mlp.gate_proj.weight", (f, e), np.transpose)
        layout[ours + ("mlp", "up")] = (f"{hf}mlp.up_proj.weight", (f, e), np.transpose)
        layout[ours + ("mlp", "down")] = (f"{hf}mlp.down_proj.weight", (e, f), np.transpose)
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
    layout = hf_layout(cfg)
    if tensor_names is not None:
        missing = [name for name, _, _ in layout.values() if name not in tensor_names]
        if missing:
            raise CheckpointError(
                f"{source}: missing {len(missing)} tensor(s) for a {cfg.architecture} model with "
                f"{cfg.num_layers} layers, e.g. {missing[:3]}")
    abstract = model.abstract_params
    shardings = model.param_shardings(mesh) if mesh is not None else None
    params: dict = {}
    for path, (name, hf_shape, transform) in layout.items():
        array = np.asarray(get_tensor(name))
        if tuple(array.shape) != hf_shape:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(array.shape)}, expected {hf_shape} "
                f"for this {cfg.architecture} config")
        target = _get(abstract, path)
        value = np.ascontiguousarray(transform(array.astype(np.float32))).astype(target.dtype)
        assert value.shape == target.shape, (path, value.shape, target.shape)
        sharding = _get(shardings, path) if shardings is not None else None
        _set(params, path, jax.device_put(value, sharding))
    return params
