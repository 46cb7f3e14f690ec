"""A model's `ModelConfig` from what a user types, without loading any weights: a shape preset
(`configs/models/NAME.json`, or any such file by path), a bundled model (read from its GGUF
header), or a GGUF file."""

from __future__ import annotations

import os

from jaxgen.models.config import ModelConfig

PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "models")


def presets() -> list[str]:
    if not os.path.isdir(PRESET_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".json"))


def model_config(name_or_path: str, dtype: str | None = None) -> ModelConfig:
    """The config `name_or_path` names, in `dtype` (None: the preset's, or bfloat16 for a
    GGUF). Bundled names win over presets of the same name (they are the real model)."""
    from jaxgen.checkpoints import CheckpointError, bundled, gguf_file

    if os.path.isfile(name_or_path):
        path = name_or_path
    elif (entry := bundled(name_or_path)) is not None:
        path = entry.locate_gguf()
    elif name_or_path in presets():
        path = os.path.join(PRESET_DIR, f"{name_or_path}.json")
    else:
        raise CheckpointError(
            f"model={name_or_path!r}: not a file, a bundled model (gemma3-270m, smollm2-135m) "
            f"or a shape preset ({', '.join(presets()) or f'none in {PRESET_DIR}'})")
    if path.endswith(".json"):
        config = ModelConfig.from_json_file(path)
        return config if dtype is None else config.replace(dtype=dtype)
    if path.endswith(".gguf"):
        return gguf_file.config_from_gguf(gguf_file.open_gguf(path), path, dtype or "bfloat16")
    raise CheckpointError(f"model={name_or_path!r}: a model file must be a .json shape "
                          "preset or a .gguf")
