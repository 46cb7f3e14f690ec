"""GGUF import: model config from the metadata (`gguf_reader`), tensors dequantized with the
`gguf` package and renamed to HF names (with llama.cpp's conversion undone), then handed to
`hf_layout`.

llama.cpp's converter changes two things we must undo: Gemma norm weights are stored as `1 + w`,
and Llama Q/K rows are permuted for its interleaved RoPE. The Gemma 3 GGUF also lacks the layer
pattern and local RoPE base, which come from the family's known configuration (as HF does).
"""

from __future__ import annotations

import os
import re

import numpy as np

from jaxgen.checkpoints.errors import CheckpointError
from jaxgen.gguf_reader import GGUFFile, GGUFFormatError
from jaxgen.models import ModelConfig, RopeScaling

# Gemma 3 family constants that the GGUF does not carry.
GEMMA3_LOCAL_ROPE_THETA = 10_000.0
GEMMA3_SLIDING_WINDOW_PATTERN = 6

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_ARCH_LAYER_NAMES = {
    "gemma3": {
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "llama": {"ffn_norm": "post_attention_layernorm"},
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def open_gguf(path: str) -> GGUFFile:
    """The file's metadata and tensor views, with a clear error for a missing or damaged file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file {path!r} does not exist")
    try:
        return GGUFFile(path)
    except (GGUFFormatError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from None


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_name(gguf_name: str, arch: str) -> str | None:
    """The HF tensor name for a GGUF tensor name, or None for tensors we do not use."""
    m = _BLOCK.match(gguf_name)
    if m:
        layer, base, kind = m.groups()
        hf = _ARCH_LAYER_NAMES[arch].get(base) or _LAYER_NAMES.get(base)
        return None if hf is None else f"model.layers.{layer}.{hf}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    hf = _GLOBAL_NAMES.get(base)
    return None if hf is None else f"{hf}.{kind}"


def config_from_gguf(reader, path: str, dtype: str) -> ModelConfig:
    arch = field(reader, "general.architecture")
    if arch not in ("gemma3", "llama"):
        raise CheckpointError(
            f"{path}: general.architecture={arch!r} is not supported; expected 'gemma3' or 'llama'")

    def req(key):
        value = field(reader, f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{path}: metadata field {arch}.{key!r} is missing")
        return value

    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' is missing")
    vocab = int(names["token_embd.weight"].shape[-1])
    hidden, heads = int(req("embedding_length")), int(req("attention.head_count"))
    head_dim = int(field(reader, f"{arch}.attention.key_length") or hidden // heads)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(req("feed_forward_length")),
        num_layers=int(req("block_count")),
        num_heads=heads,
        num_kv_heads=int(field(reader, f"{arch}.attention.head_count_kv") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(req("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(req("context_length")),
        tie_embeddings="output.weight" not in names,
        dtype=dtype,
        name=str(field(reader, "general.name") or os.path.basename(path)),
    )
    scaling_type = field(reader, f"{arch}.rope.scaling.type")
    scaling_factor = field(reader, f"{arch}.rope.scaling.factor")
    if arch == "gemma3":
        # 4B and larger scale global-layer RoPE linearly by 8 for their 128k context.
        if scaling_type is None and common["max_position_embeddings"] >= 131072:
            scaling_type, scaling_factor = "linear", 8.0
        return ModelConfig(
            architecture="gemma3",
            rope_theta=float(field(reader, "gemma3.rope.freq_base", 1_000_000.0)),
            rope_local_theta=GEMMA3_LOCAL_ROPE_THETA,
            rope_scaling=RopeScaling("linear", float(scaling_factor)) if scaling_type == "linear" else None,
            sliding_window=int(req("attention.sliding_window")),
            sliding_window_pattern=GEMMA3_SLIDING_WINDOW_PATTERN,
            # The family scales queries by 1/sqrt(256) except the 27B (head_dim 128: 1/sqrt(hidden/heads)).
            query_pre_attn_scalar=256.0 if head_dim == 256 else float(hidden // heads),
            **common,
        )
    if "rope_freqs.weight" in names:
        raise CheckpointError(
            f"{path}: tensor 'rope_freqs.weight' (llama.cpp's Llama 3.1 RoPE scaling) is not "
            "supported; load the HF safetensors checkpoint instead")
    return ModelConfig(
        architecture="llama",
        rope_theta=float(field(reader, "llama.rope.freq_base", 10_000.0)),
        rope_scaling=RopeScaling("linear", float(scaling_factor)) if scaling_type == "linear" else None,
        **common,
    )


def _unpermute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleave of Q/K (`[heads*D, E]`): rows it stored as
    (D/2, 2) pairs go back to two halves (2, D/2), the layout "rotate_half" RoPE expects."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_reader(reader, cfg: ModelConfig, path: str):
    """(get_tensor(hf_name) -> f32 array, set of HF names present) for this GGUF."""
    from gguf import quants

    by_hf = {}
    for t in reader.tensors:
        name = hf_name(t.name, cfg.architecture)
        if name is not None:
            by_hf[name] = t

    def get(name: str) -> np.ndarray:
        t = by_hf[name]
        try:
            w = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot dequantize tensor {t.name!r} "
                                  f"({t.tensor_type.name}): {e}") from None
        if cfg.architecture == "gemma3" and name.endswith("norm.weight"):
            w = w - 1.0
        elif cfg.architecture == "llama" and name.endswith("self_attn.q_proj.weight"):
            w = _unpermute_rope(w, cfg.num_heads)
        elif cfg.architecture == "llama" and name.endswith("self_attn.k_proj.weight"):
            w = _unpermute_rope(w, cfg.num_kv_heads)
        return w

    return get, set(by_hf)
