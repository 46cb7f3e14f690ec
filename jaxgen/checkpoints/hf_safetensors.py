"""HF checkpoint import: `config.json` -> ModelConfig, `*.safetensors` tensors by HF name.

Reads both transformers 4 (`rope_theta`, `rope_scaling`, `sliding_window_pattern`) and
transformers 5 (`rope_parameters`, `layer_types`) spellings. Multimodal Gemma 3 checkpoints
contribute their `text_config` and language-model tensors only.
"""

from __future__ import annotations

import json
import os

import numpy as np

from jaxgen.checkpoints.errors import CheckpointError
from jaxgen.models import ModelConfig, RopeScaling

_MODEL_TYPES = {"llama": "llama", "gemma3_text": "gemma3", "gemma3": "gemma3"}
# Prefixes of language-model tensors in multimodal wrappers, mapped back to the text names.
_PREFIXES = ("model.language_model.", "language_model.model.")


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no config.json (an HF checkpoint directory needs one)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None


def _rope(hf: dict, layer_type: str) -> tuple[float | None, RopeScaling | None]:
    """(theta, scaling) for `layer_type` from either spelling of the RoPE config."""
    params = hf.get("rope_parameters")
    if params and layer_type in params:  # transformers 5, per layer type
        params = params[layer_type]
    if params is None:
        params = dict(hf.get("rope_scaling") or {})
        if layer_type == "sliding_attention":
            params = {"rope_theta": hf.get("rope_local_base_freq")}
        params.setdefault("rope_theta", hf.get("rope_theta"))
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta")
    if kind in ("default", None):
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", float(params["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3", float(params["factor"]), float(params["low_freq_factor"]),
            float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))
    raise CheckpointError(f"config.json: rope type {kind!r} is not supported "
                          "(expected default, linear or llama3)")


def _sliding_pattern(hf: dict, num_layers: int) -> int:
    types = hf.get("layer_types")
    if types is None:
        return int(hf.get("sliding_window_pattern", 6))
    for pattern in range(1, num_layers + 2):
        if all((t == "full_attention") == ((i + 1) % pattern == 0) for i, t in enumerate(types)):
            return pattern
    raise CheckpointError(f"config.json: layer_types={types} is not a repeating "
                          "sliding/full pattern")


def config_from_hf(hf: dict, directory: str, dtype: str) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise CheckpointError(f"{directory}/config.json: model_type={model_type!r} is not "
                              f"supported; expected one of {sorted(_MODEL_TYPES)}")
    if model_type == "gemma3":
        hf = dict(hf.get("text_config") or {}, tie_word_embeddings=True)
    arch = _MODEL_TYPES[model_type]
    try:
        layers, heads, hidden = hf["num_hidden_layers"], hf["num_attention_heads"], hf["hidden_size"]
        common = dict(
            vocab_size=hf["vocab_size"], hidden_size=hidden,
            intermediate_size=hf["intermediate_size"], num_layers=layers, num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rms_norm_eps=float(hf["rms_norm_eps"]),
            max_position_embeddings=hf["max_position_embeddings"],
            tie_embeddings=bool(hf.get("tie_word_embeddings", arch == "gemma3")),
            dtype=dtype, name=os.path.basename(os.path.normpath(directory)),
        )
    except KeyError as e:
        raise CheckpointError(f"{directory}/config.json: field {e.args[0]!r} is missing") from None
    if arch == "llama":
        theta, scaling = _rope(hf, "full_attention")
        return ModelConfig(architecture="llama", rope_theta=float(theta or 10_000.0),
                           rope_scaling=scaling, **common)
    theta, scaling = _rope(hf, "full_attention")
    local_theta, _ = _rope(hf, "sliding_attention")
    return ModelConfig(
        architecture="gemma3", rope_theta=float(theta or 1_000_000.0),
        rope_local_theta=float(local_theta or 10_000.0), rope_scaling=scaling,
        sliding_window=hf.get("sliding_window"),
        sliding_window_pattern=_sliding_pattern(hf, layers),
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or 256),
        attn_logit_softcap=hf.get("attn_logit_softcapping"),
        final_logit_softcap=hf.get("final_logit_softcapping"),
        **common,
    )


def is_hf_checkpoint(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "config.json")) and any(
        n.endswith(".safetensors") for n in os.listdir(directory))


def tensor_reader(directory: str):
    """(get_tensor(hf_name) -> f32 array, set of names) over all `*.safetensors` shards."""
    from safetensors import safe_open

    files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files")
    where: dict[str, str] = {}
    for name in files:
        path = os.path.join(directory, name)
        try:
            with safe_open(path, framework="flax") as f:
                for key in f.keys():
                    for prefix in _PREFIXES:
                        if key.startswith(prefix):
                            key_text = "model." + key[len(prefix):]
                            break
                    else:
                        key_text = key
                    where[key_text] = (path, key)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated?): {e}") from None

    def get(name: str) -> np.ndarray:
        path, key = where[name]
        # "flax" (not "np"): numpy has no bfloat16, and HF checkpoints are often bf16.
        with safe_open(path, framework="flax") as f:
            return np.asarray(f.get_tensor(key), dtype=np.float32)

    return get, set(where)
