"""The split-once model wrapper and the attention metadata pytree.

`Model` builds the Flax NNX module abstractly, splits it once into a graphdef and a parameter
pytree (a nested dict of arrays), and exposes `forward` as a pure function of those params —
the only thing jitted step functions call. Knows nothing about checkpoints or scheduling.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.models.config import ModelConfig
from jaxgen.models.gemma3 import Gemma3
from jaxgen.models.llama import Llama
from jaxgen.models.sharding import kv_pages_sharding, tree_shardings

MODEL_TYPES = {"gemma3": Gemma3, "llama": Llama}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where each sequence's K/V live. S = sequence rows (slots), P = pages per sequence.

    kv_lens: i32[S] tokens per sequence after this step; page_indices: i32[S, P];
    cu_q_lens: i32[S + 1] packed query offsets; num_seqs: i32[1] live rows of S.
    decode_only (static): one query token per row, row s is sequence s — a decode step, which
    kernels run on their decode-specialised path. max_q_len (static): no sequence has more query
    rows than this (a verify step: 1 + the drafts), or None.
    """

    kv_lens: jax.Array
    page_indices: jax.Array
    cu_q_lens: jax.Array
    num_seqs: jax.Array
    decode_only: bool = dataclasses.field(default=False, metadata=dict(static=True))
    max_q_len: int | None = dataclasses.field(default=None, metadata=dict(static=True))


EMBED_LAYOUTS = ("auto", "vocab_major", "embed_major")


def resolve_embed_layout(layout: str) -> str:
    """"auto" is "vocab_major" (checkpoint order) on every platform. "embed_major" is faster
    for a tied table on CPU (see `layers.embedding_table`; docs/benchmarks.md has the figures)
    but sums the logits in another order: on Gemma 3 270M's 1,097-token parity
    prompt that moved them 1.9e-4 of their scale from HF's, past the 1e-4 the parity test
    allows, so it is opt-in until the logits are summed in the reference's order."""
    if layout not in EMBED_LAYOUTS:
        raise ValueError(f"embed_layout={layout!r}: must be one of {', '.join(EMBED_LAYOUTS)}")
    return "vocab_major" if layout == "auto" else layout


def transposed_sharding(sharding):
    """The sharding of a 2-D array's transpose: a NamedSharding's two axes swapped."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[::-1]))


def _transpose(table):
    """A 2-D table transposed; a device array keeps its sharding per logical axis."""
    if isinstance(table, jax.Array):
        return jax.jit(jnp.transpose, out_shardings=transposed_sharding(table.sharding))(table)
    return table.T


class Model:
    """A decoder of `config`, split once; `params` are a nested dict of arrays.

    `embed_layout` is how this model holds its embedding table (`resolve_embed_layout`).
    `shared_block_trace` (default) traces each block structure once per forward
    (`layers._apply_block`); False writes every layer out (its slow twin).
    Checkpoints always store it vocab-major: loaders build params in the model's layout, and
    savers take `canonical_params(params)`.
    """

    def __init__(self, config: ModelConfig, attn_backend: str = "auto",
                 embed_layout: str = "auto", shared_block_trace: bool = True):
        self.config = config
        self.shared_block_trace = shared_block_trace
        self.attn_backend = attn_backend
        self.embed_layout = resolve_embed_layout(embed_layout)
        module = nnx.eval_shape(lambda: self._build(nnx.Rngs(0)))
        self.graphdef, self._abstract_state = nnx.split(module)

    @property
    def embed_major(self) -> bool:
        return self.embed_layout == "embed_major"

    def _build(self, rngs: nnx.Rngs) -> nnx.Module:
        return MODEL_TYPES[self.config.architecture](self.config, rngs, self.attn_backend,
                                                     self.embed_major, self.shared_block_trace)

    def canonical_params(self, params):
        """`params` with the embedding table in checkpoint order (`[vocab, embed]`). Its own
        inverse (a transpose), so it is also `from_canonical`."""
        if not self.embed_major:
            return params
        return {**params, "embed": _transpose(params["embed"])}

    from_canonical = canonical_params  # checkpoint-order params into this model's layout

    @property
    def abstract_params(self):
        """Nested dict of `jax.ShapeDtypeStruct`, the shape of every parameter."""
        return nnx.to_pure_dict(self._abstract_state)

    @property
    def logical_axes(self):
        """Nested dict (same structure as params) of each parameter's logical axes."""
        axes = jax.tree.map(lambda v: v.get_metadata()["logical_axes"], self._abstract_state,
                            is_leaf=lambda x: isinstance(x, nnx.Variable))
        return nnx.to_pure_dict(axes)

    def param_shardings(self, mesh):
        return tree_shardings(self.logical_axes, self.abstract_params, mesh)

    def forward(self, params, tokens, positions, kv_pages, attn_metadata: AttentionMetadata,
                logits_indices=None):
        """`tokens, positions: i32[T]`, `kv_pages: list[L] of [N, page_size, 2*Hkv, D]` ->
        `(logits f32[T or len(logits_indices), V], kv_pages)`."""
        state = jax.tree.map(lambda x: x, self._abstract_state)  # fresh Variables to fill
        nnx.replace_by_pure_dict(state, params)
        module = nnx.merge(self.graphdef, state)
        return module(tokens, positions, list(kv_pages), attn_metadata, logits_indices)

    def init_random(self, seed: int = 0, mesh=None):
        """Random parameters (speed work and tests), created directly in their shardings."""
        def make():
            return nnx.to_pure_dict(nnx.split(self._build(nnx.Rngs(seed)))[1])
        out = None if mesh is None else self.param_shardings(mesh)
        return jax.jit(make, out_shardings=out)()

    def kv_page_shape(self, num_pages: int, page_size: int) -> tuple[int, int, int, int]:
        c = self.config
        return (num_pages, page_size, 2 * c.num_kv_heads, c.head_dim)

    def init_kv_pages(self, num_pages: int, page_size: int, dtype=None, mesh=None):
        """One zeroed page pool per layer."""
        dtype = jnp.dtype(dtype or self.config.dtype)
        shape = self.kv_page_shape(num_pages, page_size)
        sharding = None if mesh is None else kv_pages_sharding(self.config.num_kv_heads, mesh)
        make = _zeros(shape, dtype, sharding)
        return [make() for _ in range(self.config.num_layers)]


@functools.lru_cache(maxsize=64)
def _zeros(shape: tuple[int, ...], dtype, sharding):
    """One jitted maker per (shape, dtype, sharding): pools built again (an engine restarted, a
    second engine of the same model) reuse its compiled program instead of tracing, lowering
    and looking up a fresh function's."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
