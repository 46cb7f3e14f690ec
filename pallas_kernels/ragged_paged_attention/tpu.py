"""TPU (Mosaic) ragged paged attention: a decode kernel and a prefill / mixed kernel behind the
public signature; see `pallas_kernels.ragged_paged_attention` for the contract.

Design
- Both kernels take the page pool in HBM (`memory_space=ANY`) and the page table, `kv_lens`,
  `cu_q_lens`, `num_seqs` by scalar prefetch (SMEM; the page table flattened to 1-D so SMEM is
  not padded per row). KV blocks of `num_kv_pages_per_block` pages are fetched by manual async
  DMA into two VMEM slots, one DMA per whole page (`[page_size, 2*Hkv, D]`, K and V still
  interleaved); the next block (also the next sequence's first block) is in flight while the
  current one is computed. In VMEM one transpose of the block puts K and V of every kv head in
  plain `[tokens, D]` tiles (`tpu_kv_stream` says why the DMA cannot split them for 16-bit
  pools). All query heads of one kv head go through one `[rows, D] x [D, tokens]` matmul
  (GQA/MQA packing); online softmax in f32; f32 inputs use HIGHEST matmul precision.
- Decode (`decode_only=True`, `tpu_decode`): grid `(S,)`, one sequence per step, query block
  `[1, Hkv, G, D]`. Mixed (`tpu_mixed`): grid `(cdiv(T, num_queries_per_block),)`, query block
  `[Hkv, num_queries_per_block * G, D]`; each step loops over the sequences meeting its rows.
- Skipped, never fetched: KV blocks wholly before a query block's sliding window, blocks wholly
  after its last query (causal), pages past a sequence's last page, everything of idle
  (`kv_len == 0`) and padding rows. Masking is by select (pages may hold NaN): scores outside
  `kv_pos <= q_pos` (and the window) become -inf, V rows past `kv_len` become 0.
- Fused write: grid step 0 DMAs the step's new K/V (interleaved and cast to the pool dtype
  outside the kernel) into their pages before anything is fetched; the pool is aliased in -> out.
  Rows are copied, not recomputed, so written rows equal the reference bit for bit and no other
  row is touched. A token's row is all `2*Hkv` heads, so writes are aligned for every dtype.
- Each `pallas_call` carries a `pl.CostEstimate` (flops, exp/tanh count, HBM bytes) for the
  largest context its shapes allow, so XLA's scheduler and cost model see the kernel.

Contract details settled as the reference does: a query row whose position would be negative
(`q_len > kv_len`) writes nothing and outputs 0; the decode kernel never reads `cu_q_lens`
(`decode_only` promised `arange`); a page-table column past `pages_per_seq` is clamped.

Limits
- Grid semantics are sequential ("arbitrary"): step 0 writes for everybody and prefetch runs
  across steps, so a megacore chip uses one TensorCore per call.
- A block is fetched with all `2*Hkv` heads of its pages, so VMEM holds `2 slots * tokens *
  2*Hkv * D` of the pool dtype (heads are not split across grid steps); a `2*Hkv` that is
  neither a power of two below 8 nor a multiple of 8 is padded in VMEM (6 rows take 8).
- The page table, `kv_lens` and `cu_q_lens` live in SMEM whole; very large `S * pages_per_seq`
  would need the table prefetched in chunks, which these kernels do not do.
- `num_queries_per_block` is rounded up so a query block is whole sublane tiles
  (`tpu_mixed.query_block`); `head_dim` a multiple of 128 fills the lanes.
- Verified on CPU: numerics under the TPU interpreter (race detection on), and libtpu's whole
  compile (Mosaic included) for v5e and v6e targets with no TPU attached
  (tests/test_tpu_compile.py). Timings, and the numerics of the compiled kernel, need a TPU and
  were not run, so the default block sizes are reasoned, not tuned.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention import tpu_kv_stream
from pallas_kernels.ragged_paged_attention.tpu_decode import decode_attention
from pallas_kernels.ragged_paged_attention.tpu_mixed import mixed_attention


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
    """Block sizes and memory budget of the TPU kernels (hardware facts come in from here).

    num_kv_pages_per_block: pages per KV block (clamped to pages_per_seq); tokens per block =
      this * page_size. Bigger blocks mean fewer, larger DMAs and matmuls but more VMEM
      (2 slots * tokens * 2*Hkv * D * itemsize) and more wasted work past kv_len.
    num_queries_per_block: query tokens per grid step of the mixed kernel, rounded up so that
      `num_queries_per_block * (Hq / Hkv)` is a multiple of 8 (`tpu_mixed.query_block`).
    vmem_limit_bytes: scoped-VMEM limit handed to Mosaic, or None for its default.
    """
    num_kv_pages_per_block: int = 8
    num_queries_per_block: int = 32
    vmem_limit_bytes: int | None = None

    def __post_init__(self):
        for name in ("num_kv_pages_per_block", "num_queries_per_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an int >= 1")
        if self.vmem_limit_bytes is not None and self.vmem_limit_bytes < 1:
            raise ValueError(f"vmem_limit_bytes={self.vmem_limit_bytes}: must be >= 1 or None")


def _validate(q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, decode_only, sliding_window,
              soft_cap):
    t, hq, d = q.shape
    _, _, two_hkv, d_pool = kv_pages.shape
    hkv = two_hkv // 2
    if two_hkv % 2 or d_pool != d:
        raise ValueError(f"kv_pages.shape={kv_pages.shape}: must be [pages, page_size, 2*Hkv, {d}]")
    if hq % hkv:
        raise ValueError(f"q heads={hq}: must be a multiple of kv heads={hkv}")
    if k.shape != (t, hkv, d) or v.shape != (t, hkv, d):
        raise ValueError(f"k.shape={k.shape}, v.shape={v.shape}: must both be {(t, hkv, d)}")
    s = page_indices.shape[0]
    if kv_lens.shape != (s,) or cu_q_lens.shape != (s + 1,):
        raise ValueError(f"kv_lens.shape={kv_lens.shape}, cu_q_lens.shape={cu_q_lens.shape}: "
                         f"must be ({s},) and ({s + 1},) for page_indices rows={s}")
    if decode_only and t != s:
        raise ValueError(f"decode_only=True with {t} query rows: must equal sequences={s}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window={sliding_window}: must be >= 1 or None")
    if soft_cap is not None and soft_cap == 0:
        raise ValueError("soft_cap=0: must be non-zero or None")


def ragged_paged_attention(
    q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
    *, sm_scale: float, sliding_window: int | None = None, soft_cap: float | None = None,
    decode_only: bool = False, max_q_len: int | None = None,
    block_sizes: TpuBlockSizes | None = None,
):
    """TPU kernels; see `pallas_kernels.ragged_paged_attention` for shapes and semantics
    (`max_q_len` is not used)."""
    _validate(q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, decode_only, sliding_window,
              soft_cap)
    return _attention(q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                      sm_scale=float(sm_scale), sliding_window=sliding_window,
                      soft_cap=None if soft_cap is None else float(soft_cap),
                      decode_only=decode_only, block_sizes=block_sizes or TpuBlockSizes())


# Jitted so that a model's layers (same shapes, same options) share one traced and lowered
# kernel instead of tracing the kernel body once per layer, which dominated compile time.
@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap",
                                             "decode_only", "block_sizes"))
def _attention(q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale,
               sliding_window, soft_cap, decode_only, block_sizes):
    t, _, d = q.shape
    _, page_size, two_hkv, _ = kv_pages.shape
    pages_per_seq = page_indices.shape[1]
    geo = tpu_kv_stream.Geometry(
        page_size=page_size,
        pages_per_block=min(block_sizes.num_kv_pages_per_block, pages_per_seq),
        num_kv_heads=two_hkv // 2, pages_per_seq=pages_per_seq)
    new_kv = jnp.stack([k, v], axis=2).reshape(t, two_hkv, d).astype(kv_pages.dtype)
    common = dict(geo=geo, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                  vmem_limit_bytes=block_sizes.vmem_limit_bytes)
    kv_lens = kv_lens.astype(jnp.int32)
    pages_flat = page_indices.astype(jnp.int32).reshape(-1)
    num_seqs = jnp.reshape(num_seqs, (1,)).astype(jnp.int32)
    if decode_only:
        return decode_attention(q, new_kv, kv_pages, kv_lens, pages_flat, num_seqs, **common)
    return mixed_attention(q, new_kv, kv_pages, kv_lens, pages_flat,
                           cu_q_lens.astype(jnp.int32), num_seqs,
                           block_q=block_sizes.num_queries_per_block, **common)
