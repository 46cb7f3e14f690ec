"""Model math in Flax NNX: Gemma 3 and Llama decoders over a paged KV cache."""

from jaxgen.models.base import MODEL_TYPES, AttentionMetadata, Model
from jaxgen.models.config import ARCHITECTURES, ModelConfig, RopeScaling

__all__ = ["ARCHITECTURES", "MODEL_TYPES", "AttentionMetadata", "Model", "ModelConfig", "RopeScaling"]
