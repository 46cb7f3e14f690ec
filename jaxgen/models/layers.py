"""Building blocks shared by the decoder families: params with logical axes, RMSNorm, RoPE,
paged attention, gated MLP.

Every parameter is an `nnx.Param` carrying `logical_axes`; `jaxgen.models.sharding` maps those to
mesh axes. Weights are stored input-major (`x @ w`), heads split out, and the projections that
read the same input fused into one weight, so a decode token runs one matmul where it would
run two or three: `qkv: [embed, kv_heads, G + 2, head_dim]` (per KV head its G = Hq / Hkv query
heads, then K, then V; query head `h * G + j` belongs to KV head `h`, as in HF), `o: [q_heads,
head_dim, embed]`, `gate_up: [embed, 2, mlp]`. Knows nothing about checkpoints or scheduling.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from jaxgen.models.config import ModelConfig, RopeScaling


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype,
          init: str = "normal") -> nnx.Param:
    """A parameter of `shape` with its logical axes. Real values come from checkpoints; the
    initialiser only matters for random-weight speed work."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, computed in f32.

    Gemma stores the scale zero-centred and multiplies by `1 + w` (in f32, then casts);
    Llama multiplies the normalised activations, cast back, by `w`.
    """

    def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs, *, zero_centered: bool):
        self.weight = param(rngs, (dim,), ("norm",), dtype, "zeros" if zero_centered else "ones")
        self.eps = eps
        self.zero_centered = zero_centered

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...]
        if self.zero_centered:
            return (xf * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
        return w * xf.astype(x.dtype)


# How a one-row projection (T == 1: a batch-1 decode step) runs, see `project`: "gpu" (as two
# rows on GPU, plain elsewhere), "always" (as two rows everywhere) or "off" (always plain).
ONE_ROW = "gpu"
_ONE_ROW_MODES = ("gpu", "always", "off")


def project(spec: str, x: jax.Array, w: jax.Array, *, one_row: str | None = None) -> jax.Array:
    """`jnp.einsum(spec, x, w)` for token rows `x [T, ...]` against a weight `w`.

    XLA GPU strength-reduces a vector-times-matrix dot against a weight of fewer than 10M
    elements into a multiply + reduce fusion (`GpuAlgebraicSimplifier`), which reads the weight
    at about half the bandwidth a GEMM reaches (`tools/bench_projections.py`); at batch 1 that
    is Llama-3.2-1B's Q/K/V and output projections and every projection of Gemma 3 270M. Two
    rows are a matrix, so a one-row `x` runs as two (the second row zero) and the first row of
    the result is kept: the same numbers, read through a GEMM. `one_row` (default `ONE_ROW`)
    picks where.
    """
    mode = ONE_ROW if one_row is None else one_row
    if mode not in _ONE_ROW_MODES:
        raise ValueError(f"one_row={mode!r}: must be one of {', '.join(_ONE_ROW_MODES)}")
    pad = mode == "always" or (mode == "gpu" and jax.default_backend() == "gpu")
    if x.shape[0] != 1 or not pad:
        return jnp.einsum(spec, x, w)
    x2 = jnp.pad(x, ((0, 1),) + ((0, 0),) * (x.ndim - 1))
    return jnp.einsum(spec, x2, w)[:1]


def embedding_table(cfg: ModelConfig, rngs: nnx.Rngs, embed_major: bool) -> nnx.Param:
    """The token embedding table, `[vocab, embed]` (checkpoint order), or `[embed, vocab]` when
    `embed_major`: XLA CPU's vector x matrix product reads a `[embed, vocab]` matrix about 1.3x
    faster than the transposed one (`x @ w` against `x @ w.T`, 43 vs 56 ms for Gemma 3 270M's
    table on the 2-core box), and the tied output projection reads the whole table every decode
    step; a lookup gathers columns instead of rows."""
    dt = jnp.dtype(cfg.dtype)
    if embed_major:
        return param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dt)
    return param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dt)


def embed_lookup(table: jax.Array, tokens: jax.Array, embed_major: bool) -> jax.Array:
    """Rows `[T, embed]` of `tokens` from a table laid out as `embedding_table` made it."""
    return jnp.take(table, tokens, axis=1).T if embed_major else table[tokens]


# The output projection on XLA:CPU, for more than one row: the vocabulary in blocks of this many
# entries (`output_logits`).
CPU_VOCAB_BLOCK = 8192


def output_logits(x: jax.Array, w: jax.Array, vocab_axis: int,
                  blocked: bool = False) -> jax.Array:
    """`x [T, embed]` against an output projection `w` whose vocabulary axis is `vocab_axis`
    (0: `[vocab, embed]`, the tied table in checkpoint order; 1: `[embed, vocab]`): logits
    `[T, vocab]` in x's dtype.

    `blocked` (a model built for the CPU path: `blocked_logits`) computes the same products one
    block of `CPU_VOCAB_BLOCK` vocabulary rows at a time, as one batched product, where that
    helps: T > 1 and a vocabulary-major `w` of whole blocks. For more than one row XLA:CPU's
    matrix product copies (packs) the whole weight before using it, so a few-row product over a
    large vocabulary reads the table about twice; a block's copy stays in cache. Speculative
    verification (K + 1 rows) and batched decode on CPU pay this every step (measured in
    docs/benchmarks.md, "Speculative decoding"). Blocks of `[embed, vocab]` are strided and
    slower than the plain product, so they are never used. Each logit is the same sum over
    `embed`; `blocked=False` is the plain product (the slow twin, compared in
    tests/test_layers.py)."""
    t, vocab = x.shape[0], w.shape[vocab_axis]
    if not (blocked and vocab_axis == 0 and t > 1 and vocab > CPU_VOCAB_BLOCK
            and vocab % CPU_VOCAB_BLOCK == 0):
        return jnp.einsum("te,ve->tv" if vocab_axis == 0 else "te,ev->tv", x, w)
    n = vocab // CPU_VOCAB_BLOCK
    out = jnp.einsum("te,nve->ntv", x, w.reshape(n, CPU_VOCAB_BLOCK, w.shape[1]))
    return out.transpose(1, 0, 2).reshape(t, vocab)


def blocked_logits(attn_backend: str) -> bool:
    """`output_logits`' `blocked` for a model built for `attn_backend`: only the CPU path
    ("xla", what "auto" picks on a CPU host); never a model built for an accelerator (`jaxgen
    plan` compiles TPU programs on a CPU host: their products must stay plain)."""
    return pallas_kernels.resolve_backend(attn_backend) == "xla"


def tied_logits(x: jax.Array, table: jax.Array, embed_major: bool,
                blocked: bool = False) -> jax.Array:
    """`x [T, embed]` against the embedding table: logits `[T, vocab]` (in x's dtype)."""
    return output_logits(x, table, 1 if embed_major else 0, blocked)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """f32[head_dim // 2] inverse frequencies, computed in f32 on host (as the HF reference)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    # theta**x correctly rounded to f32 (f64 pow, one rounding). A 1-ulp error here becomes a
    # phase error growing with position: numpy's f32 pow is off by an ulp in ~20% of entries,
    # which put logits 1e-4 apart from the reference past ~700 tokens.
    powers = (np.float64(theta) ** exponents.astype(np.float64)).astype(np.float32)
    inv_freq = (np.float32(1.0) / powers).astype(np.float32)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
    old_len = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates `x: [T, H, D]` by `positions: i32[T]` (half-split "rotate_half" layout)."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, D/2]
    cos = jnp.cos(jnp.concatenate([freqs, freqs], -1)).astype(x.dtype)[:, None, :]
    sin = jnp.sin(jnp.concatenate([freqs, freqs], -1)).astype(x.dtype)[:, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class Attention(nnx.Module):
    """GQA/MQA self-attention over one layer's page pool, optional QK-norm (Gemma 3)."""

    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs, attn_backend: str):
        dt = jnp.dtype(cfg.dtype)
        e, hq, hkv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # One weight for Q, K and V, grouped by KV head: tensor parallelism splits it (and the
        # page pool) over KV heads, so each device holds whole GQA groups with their K/V.
        self.qkv = param(rngs, (e, hkv, hq // hkv + 2, d),
                         ("embed", "kv_heads", None, "head_dim"), dt)
        self.o = param(rngs, (hq, d, e), ("q_heads", "head_dim", "embed"), dt)
        gemma = cfg.architecture == "gemma3"
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dt, rngs, zero_centered=True) if gemma else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dt, rngs, zero_centered=True) if gemma else None
        sliding = cfg.is_sliding(layer)
        # Gemma 3 scales RoPE on global layers only; Llama on every layer.
        scaling = None if (gemma and sliding) else cfg.rope_scaling
        self.inv_freq = tuple(rope_inv_freq(d, cfg.layer_rope_theta(layer), scaling).tolist())
        self.sliding_window = cfg.sliding_window if sliding else None
        self.sm_scale = cfg.sm_scale
        self.soft_cap = cfg.attn_logit_softcap
        self.attn_backend = attn_backend

    def __call__(self, x, positions, kv_pages, md):
        qkv = project("te,ehcd->thcd", x, self.qkv[...])  # one matmul for Q, K and V
        g = qkv.shape[2] - 2
        q = qkv[:, :, :g].reshape(x.shape[0], -1, qkv.shape[-1])
        k, v = qkv[:, :, g], qkv[:, :, g + 1]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = np.asarray(self.inv_freq, np.float32)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        out, kv_pages = pallas_kernels.ragged_paged_attention(
            q, k, v, kv_pages, md.kv_lens, md.page_indices, md.cu_q_lens, md.num_seqs,
            sm_scale=self.sm_scale, sliding_window=self.sliding_window,
            soft_cap=self.soft_cap, decode_only=md.decode_only, max_q_len=md.max_q_len,
            backend=self.attn_backend,
        )
        # One 2-D matmul over (head, dim) flattened: with the 3-D einsum XLA CPU re-laid out the
        # whole o weight every step to match the attention output (~10% of a CPU decode step).
        t, hq, d = out.shape
        o = self.o[...].reshape(hq * d, -1)
        return project("tk,ke->te", out.reshape(t, hq * d), o), kv_pages


class GatedMLP(nnx.Module):
    """`down(act(gate(x)) * up(x))`: SwiGLU for Llama, GeLU-tanh for Gemma."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        e, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_up = param(rngs, (e, 2, f), ("embed", None, "mlp"), dt)  # one matmul for both
        self.down = param(rngs, (f, e), ("mlp", "embed"), dt)
        self.gelu = cfg.architecture == "gemma3"

    def __call__(self, x):
        h = project("te,ecf->tcf", x, self.gate_up[...])
        gate, up = h[:, 0], h[:, 1]
        act = jax.nn.gelu(gate, approximate=True) if self.gelu else jax.nn.silu(gate)
        return project("tf,fe->te", act * up, self.down[...])


@functools.partial(jax.jit, static_argnums=0)
def _apply_block(graphdef, state, x, positions, pages, md):
    """One block as a function of its parameters. A jitted function traced once per block
    structure and shapes: the layers of a model share one graphdef (Llama: all of them; Gemma 3:
    one for local and one for global layers), so a forward traces and lowers its block body once
    or twice instead of once per layer, and every program of the same shapes (each sampling
    level's, each engine's in one process) reuses that trace. XLA inlines the calls before it
    optimises, so the compiled step is the same as with the layers written out."""
    return nnx.merge(graphdef, state)(x, positions, pages, md)


def run_blocks(blocks, final_norm, x, positions, kv_pages, md, logits_indices=None,
               shared_trace=True):
    """Runs `x: [T, E]` through every block (each with its own layer's page pool) and the final
    norm; returns the normalised rows to take logits of (all, or `logits_indices`) and the pools.
    `shared_trace=False` runs the blocks inline: the slow twin of `_apply_block`."""
    new_pages = []
    for block, pages in zip(blocks, kv_pages):
        if shared_trace:
            graphdef, state = nnx.split(block)
            x, pages = _apply_block(graphdef, state, x, positions, pages, md)
        else:
            x, pages = block(x, positions, pages, md)
        new_pages.append(pages)
    x = final_norm(x)
    return (x if logits_indices is None else x[logits_indices]), new_pages
