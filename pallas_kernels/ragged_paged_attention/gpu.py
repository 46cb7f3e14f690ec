"""GPU (Hopper) ragged paged attention: Pallas kernels on the Triton backend.

Why Triton and not Mosaic GPU: a paged gather needs a data-dependent address per page (the page
id is read from the page table inside the kernel). Pallas' Triton backend expresses that as a
gather load: one page id per key row and `k_ref[page_of_row, row_in_page, 0:D]`, contiguous
along D, which Triton turns into 16-byte, software-pipelined `cp.async` copies (a gather of
whole `[pages, page_size, D]` tiles followed by a reshape ran at 50-80% of copy bandwidth at
decode; the row gather at 76-108%, `docs/benchmarks.md`). Pallas Mosaic GPU (JAX 0.10-0.11)
moves data with TMA / `emit_pipeline`, whose block index maps cannot read a page table, and
offers no per-page gather into shared memory; building one by hand (a TMA descriptor per page,
barriers per copy) is a research project, not a kernel.
The Triton backend is deprecated from JAX 0.11 but still ships and runs on 0.11.2; when Mosaic
GPU grows indexed async copies this module is where a port goes, behind the same function.

Two kernels, one per step shape (`decode_only` picks):
- decode: one query token per sequence. Grid `(S, Hkv, splits)`; a program holds the `G = Hq /
  Hkv` query heads of one KV head (gathered as 16 rows for the tensor-core dot) and streams its
  split of the sequence's visible blocks, `pages_per_block` pages per iteration, with an online
  softmax in f32. Split-KV keeps the GPU full at small batch and long context; splits are cut
  from each sequence's own visible blocks (window start to last live page, not the page
  table's width), at least `min_split_blocks` each. Each split returns its unnormalised
  output, max and sum, combined afterwards in XLA (tiny: splits x S x Hq x D f32; a Pallas
  kernel for the merge, tried on the H200, was 2-5x slower at small batch). The kernel
  also writes the step's new K/V into their pages (the pool is aliased in place): the loop
  covers the context before the new token and split 0 attends to the new row from registers,
  so there is no separate scatter and no ordering between the write and any read.
- mixed (prefill chunks and decode rows together): the packed query rows are cut into work
  blocks of `block_q` tokens of one sequence (a work list built in XLA from `cu_q_lens`); grid
  `(work blocks, Hkv)`; a program's rows are `block_q x G` (GQA packed), its keys run from the
  sliding-window start to its last query's position (causal), nothing else is read.

Both gather K and V rows (pool rows `2h` and `2h + 1`) straight from the one interleaved pool,
so the layout needs no copy and the pool is a single operand (which the decode kernel aliases
to its output; were the pool passed twice with one use aliased, XLA could copy it to keep
the other use's value).
Blocks outside the sliding window and past `kv_lens` are never loaded; keys that are loaded
but not visible (the tail of a last page, a foreign token in a shared block) are masked by
selection, and their V rows zero-filled by the masked load, so NaN or another tenant's data can
never reach an output. In mixed steps the new K/V are written first by an in-place scatter in
the same jitted call (the pool is donated by callers), so the kernel sees them like any other
token.

On a platform other than GPU the kernels run in Pallas interpret mode (the CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.ragged_paged_attention.reference import (decode_layout, token_layout, work_list,
                                                             write_kv)

_MASK = -0.7 * float(jnp.finfo(jnp.float32).max)
_MIN_ROWS = 16  # smallest M of a tensor-core dot


@dataclasses.dataclass(frozen=True)
class GpuBlockSizes:
    """Kernel tiling. `num_splits=None` picks enough splits to give `target_programs` programs."""

    pages_per_block: int = 4  # pages loaded per iteration (keys per block = this x page_size)
    num_splits: int | None = None  # decode split-KV factor (the grid's; see min_split_blocks)
    target_programs: int = 1056  # ~8 programs per SM on an H100 / H200 (132 SMs)
    # Decode: a sequence uses fewer of the grid's splits than would leave a split under this
    # many blocks of its own visible context (the rest of its programs exit at once).
    min_split_blocks: int = 2
    block_q: int = 16  # mixed kernel: query tokens per work block
    num_warps: int = 4
    num_stages: int = 3
    smem_bytes: int = 160 * 1024  # shared memory the K/V pipeline may use (H100: 227 KiB max)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and value < 1:
                raise ValueError(f"GpuBlockSizes.{field.name}={value}: must be >= 1")

    def pages_per_block_for(self, page_size: int, head_dim: int, itemsize: int,
                            pages_per_seq: int) -> int:
        """`pages_per_block`, lowered until K + V tiles of every pipeline stage fit in smem."""
        ppb = max(1, min(self.pages_per_block, _pow2(pages_per_seq)))
        while ppb > 1 and 2 * ppb * page_size * head_dim * itemsize * self.num_stages > \
                self.smem_bytes:
            ppb //= 2
        return ppb


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _load_kv(pool_ref, k_row, page_at, num_entries, first, pages_per_block, ok):
    """K and V rows (pool rows `k_row` and `k_row + 1` of page-table entries `first .. first +
    pages_per_block`) -> `[block_k, D]` each, V rows where `ok` is False zero. `page_at(i)`
    reads the sequence's page-table entries, of which there are `num_entries`: a block that
    starts on a window's first page (not a multiple of pages_per_block) may run past the last
    one; those rows are past the context (`ok` False) and their entries are clamped to the
    last, so the gather stays in bounds with no padded copy of the table.

    One page id per key row and a 2-D gather straight into `[block_k, D]`: contiguous along D,
    so Triton issues 16-byte `cp.async` copies and pipelines them, with no reshape of a
    `[pages, page_size, D]` tile (a layout shuffle through shared memory each block). V's
    invisible rows are zero-filled by the copy itself (masked load): unwritten rows may hold
    NaN, and 0 x NaN would poison the P.V product.
    """
    page_size, d = pool_ref.shape[1], pool_ref.shape[3]
    r = jnp.arange(pages_per_block * page_size)
    entry = jnp.minimum(first + r // page_size, num_entries - 1)
    page, offset = page_at(entry)[:, None], (r % page_size)[:, None]
    col = jnp.arange(d)[None, :]
    return (pool_ref[page, offset, k_row, col],
            pltr.load(pool_ref.at[page, offset, k_row + 1, col], mask=ok[:, None], other=0.0))


def _empty_carry(rows: int, d: int):
    """Online-softmax state before any key: output 0, running max "-inf", sum 0 (f32)."""
    return (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), _MASK, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def _online_softmax_step(q, k, v, visible, carry, sm_scale, soft_cap):
    """One key block: q `[M, D]`, k/v `[N, D]`, visible `bool[M, N]`; carry (o, m, l)."""
    o, m, l = carry
    # f32 pools get exact f32 products (not TF32): they are the precision-reference setting.
    exact = q.dtype == jnp.float32
    s = pltr.dot(q, k, trans_b=True, allow_tf32=not exact).astype(jnp.float32) * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    s = jnp.where(visible, s, _MASK)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
    alpha = jnp.exp(m - m_new)
    o = alpha[:, None] * o + pltr.dot(p.astype(v.dtype), v, allow_tf32=not exact).astype(
        jnp.float32)
    return o, m_new, alpha * l + p.sum(axis=-1)


def _decode_kernel(kv_len_ref, pages_ref, q_ref, k_new_ref, v_new_ref, pool_ref, o_ref, m_ref,
                   l_ref, pool_out_ref, *, sm_scale, soft_cap, window, pages_per_block,
                   min_split_blocks, group):
    head, split = pl.program_id(1), pl.program_id(2)
    num_splits = pl.num_programs(2)
    page_size, d = pool_ref.shape[1], pool_ref.shape[3]
    rows = o_ref.shape[0]
    block_k = pages_per_block * page_size
    kv_len = kv_len_ref[0]
    last = jnp.maximum(kv_len - 1, 0)  # the new token's position
    k_new = k_new_ref[...].astype(pool_ref.dtype)
    v_new = v_new_ref[...].astype(pool_ref.dtype)

    # Fused K/V write: split 0 of each (sequence, KV head) stores the new row into its page.
    # Nothing reads it back from memory in this call (split 0 attends to it from registers,
    # below), so the write needs no ordering against any program's loads.
    page, offset = pages_ref[last // page_size], last % page_size
    write = jnp.full((d,), (split == 0) & (kv_len > 0))
    pltr.store(pool_out_ref.at[page, offset, 2 * head, :], k_new, mask=write)
    pltr.store(pool_out_ref.at[page, offset, 2 * head + 1, :], v_new, mask=write)

    # This KV head's G query heads, gathered as `rows` rows (the tensor-core M): rows past G
    # repeat the last head and are never stored.
    r = jnp.minimum(jnp.arange(rows), group - 1)
    q = q_ref[head * group + r[:, None], jnp.arange(d)[None, :]].astype(pool_ref.dtype)

    # The loop covers the context before the new token, split by the sequence's own visible
    # blocks (not the page table's width): from the window's first page to the last context
    # page, at least `min_split_blocks` blocks a split (a short split spends its time filling
    # the pipeline); splits past that stay empty.
    ctx = kv_len - 1
    lo = 0 if window is None else jnp.maximum(kv_len - window, 0)  # first visible key
    first_page = lo // page_size
    n_blocks = pl.cdiv(jnp.maximum(pl.cdiv(ctx, page_size) - first_page, 0), pages_per_block)
    used = jnp.clip(pl.cdiv(n_blocks, min_split_blocks), 1, num_splits)
    per_split = pl.cdiv(n_blocks, used)
    first_block = split * per_split
    start = first_page + first_block * pages_per_block

    def body(i, carry):
        first = start + i * pages_per_block
        pos = first * page_size + jnp.arange(block_k)
        # Rows at or past the new token's may hold NaN, another tenant's keys, or the row the
        # fused write is storing: masked in the scores, and `_load_kv` zero-fills their V rows.
        ok = (pos < ctx) & (pos >= lo)
        k, v = _load_kv(pool_ref, 2 * head, lambda i: pages_ref[i], pages_ref.shape[0], first,
                        pages_per_block, ok)
        visible = jnp.broadcast_to(ok[None, :], (rows, block_k))
        return _online_softmax_step(q, k, v, visible, carry, sm_scale, soft_cap)

    n = jnp.clip(n_blocks - first_block, 0, per_split)
    carry = jax.lax.fori_loop(0, n, body, _empty_carry(rows, d))
    # The new token itself (always visible to its own query), in split 0. Kept out of the loop:
    # an elementwise step between the pipelined loads and the dots cost ~15% there.
    o, m, l = _attend_new_key(q, k_new, v_new, carry, (split == 0) & (kv_len > 0), sm_scale,
                              soft_cap)
    # Only the G real query rows are stored (the rest is tensor-core padding): the split
    # results are re-read by the combine, and at small batch they are ~1/8 of the K/V bytes.
    real = jnp.arange(rows) < group
    pltr.store(o_ref, o, mask=real[:, None])
    pltr.store(m_ref, m, mask=real)
    pltr.store(l_ref, l, mask=real)


def _attend_new_key(q, k, v, carry, take, sm_scale, soft_cap):
    """The online-softmax step of one key row `k`, `v` `[D]` (in registers) for q `[M, D]`;
    the carry unchanged where `take` is False."""
    o, m, l = carry
    s = jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32)[None, :], axis=-1) * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    m_new = jnp.maximum(m, s)
    alpha, p = jnp.exp(m - m_new), jnp.exp(s - m_new)
    o_new = alpha[:, None] * o + p[:, None] * v.astype(jnp.float32)[None, :]
    return (jnp.where(take, o_new, o), jnp.where(take, m_new, m),
            jnp.where(take, alpha * l + p, l))


def _combine(o, m, l):
    """Split results `o [splits, ..., D]`, `m, l [splits, ...]` -> normalised `[..., D]` f32."""
    m_max = m.max(axis=0)
    w = jnp.where(l > 0, jnp.exp(m - m_max), 0.0)
    return _normalise((w[..., None] * o).sum(axis=0), (w * l).sum(axis=0))


def _normalise(o, l):
    """`o / l` over the last axis of `o`; 0 where nothing was seen (`l == 0`: idle rows)."""
    return jnp.where(l[..., None] > 0, o / jnp.where(l > 0, l, 1.0)[..., None], 0.0)


def _decode(q, k, v, kv_pages, kv_lens, page_indices, *, sm_scale, sliding_window, soft_cap,
            blocks: GpuBlockSizes, interpret: bool):
    """Decode attention with the step's K/V written by the kernel: `(out, kv_pages)`."""
    s, hq, d = q.shape
    _, page_size, two_hkv, _ = kv_pages.shape
    hkv = two_hkv // 2
    g = hq // hkv
    rows = max(_MIN_ROWS, _pow2(g))
    ppb = blocks.pages_per_block_for(page_size, d, kv_pages.dtype.itemsize,
                                     page_indices.shape[1])
    splits = blocks.num_splits or pl.cdiv(blocks.target_programs, s * hkv)
    splits = max(1, min(splits, pl.cdiv(page_indices.shape[1], ppb)))
    kernel = functools.partial(
        _decode_kernel, sm_scale=sm_scale, soft_cap=soft_cap, window=sliding_window,
        pages_per_block=ppb, min_split_blocks=blocks.min_split_blocks, group=g)
    whole_pool = pl.BlockSpec(kv_pages.shape, lambda b, h, i: (0, 0, 0, 0))
    new_row = pl.BlockSpec((None, None, d), lambda b, h, i: (b, h, 0))
    o, m, l, kv_pages = pl.pallas_call(
        kernel,
        grid=(s, hkv, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h, i: (b,)),
            pl.BlockSpec((None, page_indices.shape[1]), lambda b, h, i: (b, 0)),
            pl.BlockSpec((None, hq, d), lambda b, h, i: (b, 0, 0)),
            new_row, new_row, whole_pool,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, d), lambda b, h, i: (i, b, h, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, i: (i, b, h, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, i: (i, b, h, 0)),
            whole_pool,
        ],
        out_shape=[
            jax.ShapeDtypeStruct((splits, s, hkv, rows, d), jnp.float32),
            jax.ShapeDtypeStruct((splits, s, hkv, rows), jnp.float32),
            jax.ShapeDtypeStruct((splits, s, hkv, rows), jnp.float32),
            jax.ShapeDtypeStruct(kv_pages.shape, kv_pages.dtype),
        ],
        input_output_aliases={5: 3},  # the pool is written in place (callers donate it)
        compiler_params=pltr.CompilerParams(num_warps=blocks.num_warps,
                                            num_stages=blocks.num_stages),
        interpret=interpret,
        name="rpa_decode",
    )(kv_lens, page_indices, q, k, v, kv_pages)
    out = _combine(o[..., :g, :], m[..., :g], l[..., :g])  # padding rows were never written
    return out.reshape(s, hq, d).astype(q.dtype), kv_pages


def _mixed_kernel(work_ref, pages_ref, q_ref, pool_ref, o_ref, *,
                  sm_scale, soft_cap, window, pages_per_block, group, block_q):
    # work row: (first query row, live rows, position of the first row, sequence)
    q_start, n_rows, pos0, seq = work_ref[0], work_ref[1], work_ref[2], work_ref[3]
    head = pl.program_id(1)
    page_size = pool_ref.shape[1]
    block_k = pages_per_block * page_size
    q = q_ref[pl.ds(q_start, block_q)]
    q = q.reshape(block_q * group, q.shape[-1])
    row = jnp.arange(block_q * group) // group
    q_pos = pos0 + row
    row_ok = row < n_rows
    hi = pos0 + jnp.maximum(n_rows, 1)  # keys [lo, hi) can be visible
    lo = 0 if window is None else jnp.maximum(pos0 - window + 1, 0)
    first_page = lo // page_size

    def body(i, carry):
        first = first_page + i * pages_per_block
        pos = first * page_size + jnp.arange(block_k)
        k, v = _load_kv(pool_ref, 2 * head, lambda i: pages_ref[seq, i], pages_ref.shape[1],
                        first, pages_per_block, (pos >= lo) & (pos < hi))
        visible = (pos[None, :] <= q_pos[:, None]) & row_ok[:, None]
        if window is not None:
            visible &= pos[None, :] > q_pos[:, None] - window
        return _online_softmax_step(q, k, v, visible, carry, sm_scale, soft_cap)

    d = q.shape[1]
    n = jnp.where(n_rows > 0, pl.cdiv(pl.cdiv(hi, page_size) - first_page, pages_per_block), 0)
    o, _, l = jax.lax.fori_loop(0, n, body, _empty_carry(*q.shape))
    o = _normalise(o, l)
    o_ref[...] = o.reshape(block_q, group, d).astype(o_ref.dtype)


def _mixed(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, seq, live, *, sm_scale,
           sliding_window, soft_cap, blocks: GpuBlockSizes, interpret: bool):
    """`seq`, `live`: the rows' `token_layout`, computed once by the caller."""
    t, hq, d = q.shape
    _, page_size, two_hkv, _ = kv_pages.shape
    hkv = two_hkv // 2
    g = hq // hkv
    gp = _pow2(g)
    bq = max(blocks.block_q, pl.cdiv(_MIN_ROWS, gp))
    s = kv_lens.shape[0]
    num_blocks = pl.cdiv(t, bq) + s
    work, starts = work_list(cu_q_lens, kv_lens, num_seqs, num_blocks, bq)
    ppb = blocks.pages_per_block_for(page_size, d, kv_pages.dtype.itemsize,
                                     page_indices.shape[1])
    qh = q.reshape(t, hkv, g, d).transpose(1, 0, 2, 3)
    qh = jnp.pad(qh, ((0, 0), (0, bq), (0, gp - g), (0, 0))).astype(kv_pages.dtype)
    kernel = functools.partial(
        _mixed_kernel, sm_scale=sm_scale, soft_cap=soft_cap, window=sliding_window,
        pages_per_block=ppb, group=gp, block_q=bq)
    o = pl.pallas_call(
        kernel,
        grid=(num_blocks, hkv),
        in_specs=[
            pl.BlockSpec((None, 4), lambda b, h: (b, 0)),
            pl.BlockSpec(page_indices.shape, lambda b, h: (0, 0)),
            pl.BlockSpec((None, t + bq, gp, d), lambda b, h: (h, 0, 0, 0)),
            pl.BlockSpec(kv_pages.shape, lambda b, h: (0, 0, 0, 0)),  # gathered by page id
        ],
        out_specs=pl.BlockSpec((None, None, bq, gp, d), lambda b, h: (h, b, 0, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((hkv, num_blocks, bq, gp, d), q.dtype),
        compiler_params=pltr.CompilerParams(num_warps=blocks.num_warps,
                                            num_stages=blocks.num_stages),
        interpret=interpret,
        name="rpa_mixed",
    )(work, page_indices, qh, kv_pages)
    # Back to packed rows: token t of sequence s sits in block starts[s] + local // bq.
    local = jnp.arange(t) - cu_q_lens[seq]
    blk = jnp.where(live, starts[seq] + local // bq, 0)
    out = o[:, blk, local % bq, :g]  # [Hkv, T, G, D]
    out = jnp.where(live[None, :, None, None], out, 0)
    return out.transpose(1, 0, 2, 3).reshape(t, hq, d)


def ragged_paged_attention(q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale: float, sliding_window: int | None = None,
                           soft_cap: float | None = None, decode_only: bool = False,
                           max_q_len: int | None = None,
                           block_sizes: GpuBlockSizes | None = None):
    """GPU backend; see `pallas_kernels.ragged_paged_attention` for the contract (`max_q_len`
    is not used)."""
    blocks = block_sizes or GpuBlockSizes()
    interpret = jax.default_backend() != "gpu"
    common = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                  blocks=blocks, interpret=interpret)
    if decode_only:
        # Idle slots (kv_len 0) and rows past num_seqs get kv_len 0: nothing read or written,
        # output 0. The kernel writes the new K/V itself.
        _, _, live = decode_layout(kv_lens, num_seqs)
        return _decode(q, k, v, kv_pages, jnp.where(live, kv_lens, 0), page_indices, **common)
    seq, pos, live = token_layout(cu_q_lens, kv_lens, num_seqs, q.shape[0])
    kv_pages = write_kv(kv_pages, k, v, seq, pos, live, page_indices)
    out = _mixed(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, seq, live, **common)
    return out, kv_pages
