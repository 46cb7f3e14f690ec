"""Model configuration: one frozen dataclass for every supported decoder family.

Knows architecture hyper-parameters and how to (de)serialise them; knows nothing about
checkpoints, meshes or serving.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

ARCHITECTURES = ("gemma3", "llama")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: "llama3" (frequency-dependent) or "linear" (positions / factor).

    Gemma 3 applies its scaling to global layers only; Llama to every layer.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("llama3", "linear"):
            raise ValueError(f"rope_scaling.rope_type={self.rope_type!r}: must be 'llama3' or 'linear'")
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor={self.factor}: must be > 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_embeddings: bool = True
    rope_scaling: RopeScaling | None = None
    # Gemma 3 only.
    rope_local_theta: float | None = None
    sliding_window: int | None = None
    sliding_window_pattern: int | None = None  # every Nth layer is global, the rest local
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # Names the parameter dtype, which is also the activation dtype.
    dtype: str = "float32"
    name: str = ""

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture={self.architecture!r}: must be one of {ARCHITECTURES}"
            )
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                      "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field}={getattr(self, field)}: must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads}: must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}: must be float32, bfloat16 or float16")

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` uses sliding-window (local) attention."""
        if self.sliding_window is None or not self.sliding_window_pattern:
            return False
        return (layer + 1) % self.sliding_window_pattern != 0

    def layer_rope_theta(self, layer: int) -> float:
        if self.is_sliding(layer) and self.rope_local_theta is not None:
            return self.rope_local_theta
        return self.rope_theta

    @property
    def sm_scale(self) -> float:
        scalar = self.query_pre_attn_scalar or self.head_dim
        return float(scalar) ** -0.5

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"model config has unknown fields {unknown}; known: {sorted(known)}")
        data = dict(data)
        if data.get("rope_scaling") is not None:
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        return cls(**data)

    @classmethod
    def from_json_file(cls, path: str) -> "ModelConfig":
        """A config file such as the shape presets in configs/models/."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
