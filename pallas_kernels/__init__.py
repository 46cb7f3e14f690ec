"""Pallas kernels for jaxgen. Kernels only: nothing here imports jaxgen.

Each kernel package has a plain-jnp `reference.py` (the oracle and the CPU path), hardware
kernels behind the same public function, and a docstring giving every shape and dtype.
"""

from pallas_kernels.ragged_paged_attention import (
    BACKENDS,
    ragged_paged_attention,
    resolve_backend,
)

__all__ = ["BACKENDS", "ragged_paged_attention", "resolve_backend"]
