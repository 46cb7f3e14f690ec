"""Ragged paged attention: one public function for mixed prefill + decode batches.

The step's new K/V are written into their pages (fused write, the pool is donated by callers)
and every query token attends to its own sequence's pages only. Backends sit behind
`ragged_paged_attention`: the plain-jnp reference (the oracle), a blocked plain-XLA version (the
CPU path: reads only live context), a TPU Mosaic kernel and a GPU kernel, all under the same
signature. Kernel modules are imported on first use, so the
reference path needs nothing beyond jax. On a context mesh the Pallas kernels run per device,
split by kv heads (`sharding`); the plain-jnp backends are partitioned by XLA itself.
"""

from __future__ import annotations

import functools
import importlib

import jax

from pallas_kernels.ragged_paged_attention import reference, sharding

BACKENDS = ("reference", "xla", "tpu", "gpu")
# What "auto" picks per platform ("xla": blocked plain-XLA, the CPU path); else the reference.
_AUTO = {"tpu": "tpu", "gpu": "gpu", "cpu": "xla"}
# Pallas custom calls, which XLA cannot partition over a mesh by itself.
_KERNEL_BACKENDS = ("tpu", "gpu")


def resolve_backend(backend: str = "auto", platform: str | None = None) -> str:
    """The concrete backend for `backend` ("auto" picks by platform) on `platform`."""
    if backend == "auto":
        return _AUTO.get(platform or jax.default_backend(), "reference")
    if backend not in BACKENDS:
        raise ValueError(f"attention backend={backend!r}: must be 'auto' or one of {BACKENDS}")
    return backend


def _backend_module(name: str):
    if name == "reference":
        return reference
    return importlib.import_module(f"pallas_kernels.ragged_paged_attention.{name}")


def ragged_paged_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    decode_only: bool = False,
    max_q_len: int | None = None,
    block_sizes=None,
    backend: str = "auto",
    head_axis: str | None = "model",
) -> tuple[jax.Array, jax.Array]:
    """Writes this step's K/V into their pages, then attends each query token to its sequence.

    Tokens of all sequences are packed along one axis: sequence `s` owns query rows
    `cu_q_lens[s]:cu_q_lens[s+1]`, which are the last `q_len` tokens of its `kv_lens[s]` tokens
    (so a query row at offset `i` has position `kv_lens[s] - q_len + i`). Rows at or past
    `cu_q_lens[num_seqs]` are padding, and so are the rows of a sequence whose `kv_lens` entry is
    0 (an idle slot): nothing is written for them and their output is 0.

    Args:
      q: `[T, Hq, D]` float (f32 / bf16) queries, RoPE already applied.
      k: `[T, Hkv, D]` keys of the T new tokens; `v`: `[T, Hkv, D]` values. `Hq % Hkv == 0`.
      kv_pages: `[num_pages, page_size, 2 * Hkv, D]` page pool of one layer, token-major; row
        `2h` holds K of kv head `h`, row `2h + 1` its V. Any float dtype; new K/V are cast to it.
      kv_lens: `i32[S]` tokens of each sequence after this step (context + new tokens).
      page_indices: `i32[S, pages_per_seq]` page ids of each sequence, in order.
      cu_q_lens: `i32[S + 1]` cumulative query lengths, non-decreasing, `cu_q_lens[0] == 0`.
      num_seqs: `i32[1]` (or scalar) number of live sequences; rows of S past it are ignored.
      sm_scale: softmax scale applied to `q·k`.
      sliding_window: if set, a query at position p sees keys at positions `> p - window`.
      soft_cap: if set, scores become `soft_cap * tanh(scores / soft_cap)` before masking.
      decode_only: static promise that every sequence has exactly one query row and row `s`
        belongs to sequence `s` (`T == S`, `cu_q_lens == arange(S + 1)`): a decode step. Kernels
        use a decode-specialised path; the result is the same.
      max_q_len: static promise that no sequence has more than this many query rows (a
        speculative verify step: 1 + the drafts); the blocked XLA backend then sizes its work
        blocks to it, one per sequence, instead of blocks of `block_q` rows. The result is the
        same; the other backends ignore it.
      block_sizes: backend-specific block-size / memory-budget parameters (a dataclass of the
        backend module), or None for its defaults. Ignored by the reference.
      backend: "auto" (by platform) or one of `BACKENDS`.
      head_axis: the axis of the context mesh (if any) that splits kv heads: a Pallas kernel
        runs per device on its heads when this axis divides Hkv, else replicated (`sharding`).
        The caller shards `q`, `k`, `v` and the pool's `2*Hkv` dimension the same way.

    Returns:
      `(out [T, Hq, D] in q.dtype, kv_pages with the new K/V written)`.

    A sequence only ever reads pages listed in its own `page_indices` row, and within them only
    positions below its `kv_lens` entry, so stale or foreign data (even NaN) never leaks in.
    """
    if max_q_len is not None and (not isinstance(max_q_len, int) or max_q_len < 1):
        raise ValueError(f"max_q_len={max_q_len!r}: must be an integer >= 1 (or None)")
    resolved = resolve_backend(backend)
    call = functools.partial(
        _backend_module(resolved).ragged_paged_attention, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap, decode_only=decode_only,
        max_q_len=max_q_len, block_sizes=block_sizes)
    if resolved in _KERNEL_BACKENDS:
        call = sharding.per_device(call, kv_pages.shape[2] // 2, head_axis)
    return call(q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
