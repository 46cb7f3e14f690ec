"""Pieces shared by the TPU decode and mixed kernels: the fused new-K/V write, the double-buffered
stream of a sequence's KV blocks from the HBM page pool into VMEM, the online-softmax update and
the cost estimate XLA sees.

A *work item* is one sequence seen by one query block (the decode kernel: one sequence per grid
step). Its KV range is the pages `[lo, hi)` its query rows can see (window start to last query
position); a KV block is `pages_per_block` consecutive entries of that range, fetched with one
DMA per page: the whole `[page_size, 2*Hkv, D]` page, K and V still interleaved. Pages of a
block past `hi` are not fetched; their VMEM rows hold stale data and are masked by select.

Why whole pages: a DMA may only slice the pool's tiled dimension (`2*Hkv`, the second-minor)
in whole packed rows. A bfloat16 row is half of a 32-bit word (rows `2h` and `2h + 1`, K and V
of head `h`, share one), so the per-head, per-K-or-V DMA that works for float32 is rejected by
Mosaic for every 16-bit pool. A whole page is always aligned, and it is one descriptor instead of
`2*Hkv`. K and V are separated in VMEM instead: one `[L, 2*Hkv, D] -> [2*Hkv, L, D]` transpose of
the block (Mosaic lowers it to sublane-strided loads, which also unpack the packed pairs), after
which K of head `h` is row `2h` and V row `2h + 1` as plain `[L, D]` tiles. No ref is reshaped
or bitcast, so the TPU interpreter runs the same code Mosaic compiles.

Double buffering runs across work items: while the last block of an item is computed, the first
block of the next item is already in flight. `state_ref` (SMEM, kept across grid steps) says
whether that happened and which slot the next fetch goes to: `[pending, next_slot]`. Fetches
alternate slots, so an item's first block always sits in the slot before `next_slot`. The kernels
therefore use sequential ("arbitrary") grid semantics.

`attend_item` runs one work item end to end (online softmax over its streamed blocks) for query
rows laid out `[Hkv, R, D]`; `stream_call` is the `pallas_call` frame both kernels share (scalar
prefetch, the pool in HBM aliased in -> out, the scratch above, the cost estimate). Grids, query
blocks and which sequences a grid step visits are the kernels' business.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

PENDING, NEXT_SLOT = 0, 1
STATE_SIZE = 2
LANES = 128  # m / l scratch rows are lane-replicated, as Mosaic wants whole vregs
SUBLANES = 8  # a block's second-minor dimension must be a multiple of this (or the whole array)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static shapes of one call: page size, pages per KV block, kv heads, pages per sequence."""
    page_size: int
    pages_per_block: int
    num_kv_heads: int
    pages_per_seq: int

    @property
    def block_tokens(self) -> int:
        return self.page_size * self.pages_per_block


@dataclasses.dataclass(frozen=True)
class Item:
    """A sequence's KV page range `[lo, hi)` (page-table positions) and its block count."""
    seq: jax.Array
    lo: jax.Array
    hi: jax.Array
    num_blocks: jax.Array

    def where(self, pred, other: "Item") -> "Item":
        """This item where `pred`, else `other` (traced choice of a successor)."""
        mine = (self.seq, self.lo, self.hi, self.num_blocks)
        theirs = (other.seq, other.lo, other.hi, other.num_blocks)
        return Item(*(jnp.where(pred, a, b) for a, b in zip(mine, theirs)))


def make_item(geo: Geometry, seq, live, first_pos, last_pos, window: int | None) -> Item:
    """The pages seen by query positions `first_pos..last_pos` (keys `> pos - window`)."""
    first_key = 0 if window is None else first_pos - window + 1
    lo = jnp.maximum(first_key, 0) // geo.page_size
    hi = jnp.minimum(last_pos // geo.page_size + 1, geo.pages_per_seq)
    num_blocks = jnp.where(live & (hi > lo), pl.cdiv(hi - lo, geo.pages_per_block), 0)
    return Item(seq, lo, hi, num_blocks)


def _page_copies(geo, refs, item: Item, block, slot):
    """[(fetch this page?, its DMA)] for KV block `block` of `item` into `slot`: whole pages."""
    pages_ref, pool_hbm, kv_buf, sems = refs
    out = []
    for i in range(geo.pages_per_block):
        page = item.lo + block * geo.pages_per_block + i
        fetch = page < item.hi
        page_id = pages_ref[item.seq * geo.pages_per_seq + jnp.minimum(page, geo.pages_per_seq - 1)]
        copy = pltpu.make_async_copy(pool_hbm.at[page_id],
                                     kv_buf.at[slot, pl.ds(i * geo.page_size, geo.page_size)],
                                     sems.at[slot])
        out.append((fetch, copy))
    return out


def _copy_block(geo, refs, item, block, slot, *, wait: bool):
    """Starts (or waits for) the fetch of KV block `block` of `item` into `slot`."""
    for fetch, copy in _page_copies(geo, refs, item, block, slot):
        @pl.when(fetch)
        def _():
            (copy.wait if wait else copy.start)()


def _start_into_next_slot(geo, refs, state_ref, item, block):
    slot = state_ref[NEXT_SLOT]
    _copy_block(geo, refs, item, block, slot, wait=False)
    state_ref[NEXT_SLOT] = 1 - slot


def init_stream_state(state_ref):
    state_ref[PENDING] = 0
    state_ref[NEXT_SLOT] = 0


def run_item(geo: Geometry, refs, state_ref, item: Item, successor: Item,
             compute: Callable[[jax.Array, jax.Array], None]):
    """Streams `item`'s KV blocks, calling `compute(block, slot)` on each once it is in VMEM.

    `successor` is the item the kernel runs next (num_blocks 0 when none): its first block is
    started while this item's last block is computed, and it must really run next.
    """
    @pl.when((item.num_blocks > 0) & (state_ref[PENDING] == 0))
    def _():
        _start_into_next_slot(geo, refs, state_ref, item, 0)

    first_slot = 1 - state_ref[NEXT_SLOT]  # block 0 was the latest fetch started
    state_ref[PENDING] = 0

    def body(block, carry):
        slot = (first_slot + block) % 2
        _copy_block(geo, refs, item, block, slot, wait=True)

        @pl.when(block + 1 < item.num_blocks)
        def _():
            _start_into_next_slot(geo, refs, state_ref, item, block + 1)

        @pl.when((block + 1 == item.num_blocks) & (successor.num_blocks > 0))
        def _():
            _start_into_next_slot(geo, refs, state_ref, successor, 0)
            state_ref[PENDING] = 1

        compute(block, slot)
        return carry

    lax.fori_loop(0, item.num_blocks, body, 0)


def key_positions(geo: Geometry, item: Item, block, axis: int = 1):
    """Sequence position of every row of KV block `block`: `i32[1, L]` (axis 1) or `[L, 1]`."""
    first = (item.lo + block * geo.pages_per_block) * geo.page_size
    shape = (1, geo.block_tokens) if axis == 1 else (geo.block_tokens, 1)
    return first + lax.broadcasted_iota(jnp.int32, shape, axis)


def written_rows(geo: Geometry, item: Item, block, kv_len):
    """`bool[L, 1]`: rows of KV block `block` that were fetched and hold written tokens."""
    end = jnp.minimum(kv_len, item.hi * geo.page_size)
    return key_positions(geo, item, block, axis=0) < end


def row_tokens(first_token, num_rows: int, group: int):
    """`i32[num_rows, 1]`: token of each query row when rows are `token * group + head`."""
    rows = lax.broadcasted_iota(jnp.int32, (num_rows, 1), 0)
    if group & (group - 1) == 0:  # a shift where it can, as vector division may not lower
        return first_token + (rows >> (group.bit_length() - 1))
    return first_token + rows // group


def init_softmax(m_ref, l_ref, acc_ref):
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)


def update_softmax(q, k, v, visible, key_valid, m_ref, l_ref, acc_ref, *, sm_scale, soft_cap):
    """One online-softmax step for the q heads of one kv head.

    q `[R, D]`, k / v `[L, D]` straight from VMEM (rows past kv_len or outside the fetched pages
    may hold anything, NaN included), visible `bool[R, L]`, key_valid (written,
    fetched rows) as a column `bool[L, 1]`, m / l refs `[R, LANES]`, acc ref `[R, D]`, all f32.
    """
    if q.dtype != k.dtype:  # e.g. f32 queries on a bf16 pool: one matmul dtype for both
        dtype = jnp.promote_types(q.dtype, k.dtype)
        q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    # Select, never multiply: 0 * NaN is NaN. Scores are selected below, so only V needs it.
    v = jnp.where(key_valid, v, jnp.zeros_like(v))
    # Explicit both ways: a global jax_default_matmul_precision="highest" would otherwise ask
    # Mosaic for a bf16 matmul at f32 precision, which it rejects ("Bad lhs type").
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    s = jnp.where(visible, s, -jnp.inf)
    m_prev, l_prev = m_ref[:, :1], l_ref[:, :1]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # row saw nothing yet: avoid inf - inf
    p = jnp.exp(s - m_safe)
    alpha = jnp.exp(m_prev - m_safe)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)
    m_ref[...] = jnp.broadcast_to(m_next, m_ref.shape)
    l_ref[...] = jnp.broadcast_to(alpha * l_prev + jnp.sum(p, axis=1, keepdims=True), l_ref.shape)
    acc_ref[...] = alpha * acc_ref[...] + pv


def finish_softmax(l_ref, acc_ref):
    """`acc / l`, and 0 for rows that saw no key."""
    l = l_ref[:, :1]
    return jnp.where(l > 0, acc_ref[...] / jnp.where(l > 0, l, 1.0), 0.0)


def attend_item(geo: Geometry, refs, softmax_refs, state_ref, item: Item, successor: Item,
                q_ref, o_ref, q_pos, in_item, kv_len, *, sm_scale, sliding_window, soft_cap):
    """Attends the rows `in_item` of `q_ref [Hkv, R, D]`, at positions `q_pos`, to `item`'s KV
    blocks and stores their outputs in `o_ref [Hkv, R, D]`; other rows of `o_ref` are kept.

    `in_item` and `q_pos` are `[R, 1]` columns or scalars (a decode item: every row, one
    position). `softmax_refs` is the `(m, l, acc)` scratch, `[Hkv, R, LANES | D]` f32.
    """
    kv_buf = refs[2]
    m_ref, l_ref, acc_ref = softmax_refs

    @pl.when(item.num_blocks > 0)
    def _():
        init_softmax(m_ref, l_ref, acc_ref)

    def compute(block, slot):
        key_pos = key_positions(geo, item, block)
        visible = in_item & (key_pos <= q_pos)  # causal; rows past kv_len are never visible
        if sliding_window is not None:
            visible &= key_pos > q_pos - sliding_window
        key_valid = written_rows(geo, item, block, kv_len)
        heads = jnp.swapaxes(kv_buf[slot], 0, 1)  # [2*Hkv, L, D]: K of head h is row 2h
        for h in range(geo.num_kv_heads):
            update_softmax(q_ref[h], heads[2 * h], heads[2 * h + 1], visible, key_valid,
                           m_ref.at[h], l_ref.at[h], acc_ref.at[h],
                           sm_scale=sm_scale, soft_cap=soft_cap)

    run_item(geo, refs, state_ref, item, successor, compute)

    @pl.when(item.num_blocks > 0)
    def _():
        for h in range(geo.num_kv_heads):
            out = finish_softmax(l_ref.at[h], acc_ref.at[h]).astype(o_ref.dtype)
            o_ref[h] = jnp.where(in_item, out, o_ref[h])


def context_tokens(geo: Geometry, window: int | None, span: int) -> int:
    """The most context tokens one work item fetches: whole pages from the window start of its
    first query row to its last row, `span` rows apart (all of a sequence's pages without a
    window)."""
    pages = geo.pages_per_seq
    if window is not None:
        pages = min(pages, -(-(window + span - 1) // geo.page_size) + 1)
    return pages * geo.page_size


def cost_estimate(geo: Geometry, *, items: int, rows_per_item: int, q, new_kv, kv_pages,
                  window: int | None, soft_cap: float | None) -> pl.CostEstimate:
    """What a call does at most, for XLA's scheduler and cost model: `items` work items of
    `rows_per_item` query tokens each, every item at the largest context it can see (the call's
    shapes bound it; the real `kv_lens` are unknown when compiling). Counts the two attention
    matmuls, the exp (and tanh with a soft-cap) of every score, and HBM traffic: the context read,
    queries in, outputs out, and the new K/V read and written into their pages."""
    _, num_q_heads, head_dim = q.shape
    context = context_tokens(geo, window, rows_per_item)
    scores = items * rows_per_item * num_q_heads * context
    row_bytes = kv_pages.shape[2] * head_dim * kv_pages.dtype.itemsize  # one token's K and V
    return pl.CostEstimate(
        flops=4 * head_dim * scores,
        transcendentals=scores * (1 if soft_cap is None else 2),
        bytes_accessed=(items * context * row_bytes + 2 * q.size * q.dtype.itemsize
                        + 2 * new_kv.size * new_kv.dtype.itemsize))


def stream_call(kernel, scalars, q, new_kv, kv_pages, *, geo: Geometry, q_spec, grid,
                softmax_rows, vmem_limit_bytes, cost, name):
    """`kernel` over `grid` with `scalars` (i32 arrays) by scalar prefetch, `q` blocked by
    `q_spec` (the output alike), `new_kv` and `kv_pages` in HBM with the pool aliased to output 1,
    and the scratch `kernel` takes after its outputs: `kv_buf [2, L, 2*Hkv, D], sems, write_sem,
    state_ref, m_ref, l_ref, acc_ref`, the softmax refs `[*softmax_rows, LANES | D]`. `cost` is
    the call's `pl.CostEstimate`."""
    head_dim = q.shape[-1]
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    buf = pltpu.VMEM((2, geo.block_tokens, 2 * geo.num_kv_heads, head_dim), kv_pages.dtype)
    stats = pltpu.VMEM((*softmax_rows, LANES), jnp.float32)
    scratch = [
        buf,
        pltpu.SemaphoreType.DMA((2,)),
        pltpu.SemaphoreType.DMA(()),
        pltpu.SMEM((STATE_SIZE,), jnp.int32),
        stats, stats,
        pltpu.VMEM((*softmax_rows, head_dim), jnp.float32),
    ]
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(scalars), grid=grid,
            in_specs=[q_spec, any_spec, any_spec], out_specs=[q_spec, any_spec],
            scratch_shapes=scratch),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct(kv_pages.shape, kv_pages.dtype)],
        input_output_aliases={len(scalars) + 2: 1},  # the pool: after the scalars, q and new_kv
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("arbitrary",), vmem_limit_bytes=vmem_limit_bytes),
        cost_estimate=cost,
        name=name,
    )(*scalars, q, new_kv, kv_pages)


def write_run(geo: Geometry, new_kv_hbm, pool_hbm, sem, pages_ref, seq, src_row, first_pos,
              count, *, wait: bool):
    """Starts (or waits for) the DMAs that put `count` new tokens, rows `src_row...` of
    `new_kv_hbm [T, 2*Hkv, D]`, at positions `first_pos...` of sequence `seq`.

    Each page touched gets at most log2(page_size) + 1 copies of static power-of-two lengths.
    """
    ps = geo.page_size
    first_page = first_pos // ps
    num_pages = jnp.where(count > 0, (first_pos + count - 1) // ps - first_page + 1, 0)

    def page_body(i, carry):
        page = first_page + i
        start = jnp.maximum(first_pos, page * ps)
        n = jnp.minimum(first_pos + count, (page + 1) * ps) - start
        page_id = pages_ref[seq * geo.pages_per_seq + jnp.minimum(page, geo.pages_per_seq - 1)]
        for bit in reversed(range(ps.bit_length())):
            chunk = 1 << bit
            done = n & ~(2 * chunk - 1)  # tokens already covered by the larger chunks

            @pl.when((n & chunk) != 0)
            def _():
                copy = pltpu.make_async_copy(
                    new_kv_hbm.at[pl.ds(src_row + start - first_pos + done, chunk)],
                    pool_hbm.at[page_id, pl.ds(start - page * ps + done, chunk)], sem)
                (copy.wait if wait else copy.start)()
        return carry

    lax.fori_loop(0, num_pages, page_body, 0)
