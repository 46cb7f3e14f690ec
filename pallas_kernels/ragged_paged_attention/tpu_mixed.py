"""TPU prefill / mixed kernel: ragged query blocks over any mix of prefill chunks and decode rows.

Queries are laid out `[Hkv, T_pad * G, D]` (row `t * G + g` is query head `h * G + g` of token
`t`), so one query block of `bq` tokens is a `[bq * G, D]` tile per kv head: all query heads of
a kv head share one matmul against each KV block. Grid `(cdiv(T, bq),)`, sequential. Step `b`
walks the sequences whose rows meet block `b` (from `first_seq[b]`, computed outside); each
(block, sequence) pair is a work item of `tpu_kv_stream` whose KV range runs from the window
start of its first row to its last row's position, so KV blocks wholly before the window or
wholly after the block's last query (causal) are never fetched. Rows of other sequences, padding
rows and rows of idle (`kv_len == 0`) sequences keep the zeros the step starts with.

Step 0 first writes every sequence's new K/V into its pages (`tpu_kv_stream.write_run`: runs of
power-of-two lengths per page), all started, then all waited, before any KV is fetched.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.ragged_paged_attention import tpu_kv_stream as kvs


def _write_new_tokens(geo, kv_lens_ref, pages_ref, cu_ref, new_kv_hbm, pool_hbm, sem, num_seqs):
    for wait in (False, True):
        def body(s, carry):
            kv_len, q_end = kv_lens_ref[s], cu_ref[s + 1]
            # Rows before position 0 (q_len > kv_len) and idle sequences write nothing.
            count = jnp.where(kv_len > 0, jnp.minimum(q_end - cu_ref[s], kv_len), 0)
            kvs.write_run(geo, new_kv_hbm, pool_hbm, sem, pages_ref, s, q_end - count,
                          kv_len - count, count, wait=wait)
            return carry

        lax.fori_loop(0, num_seqs, body, 0)


def _mixed_kernel(
    kv_lens_ref, pages_ref, cu_ref, num_seqs_ref, first_seq_ref,  # scalar prefetch (SMEM)
    q_ref, new_kv_hbm, _pool_in,  # q [Hkv, bq * G, D]; new K/V [T, 2*Hkv, D]; the aliased pool
    o_ref, pool_hbm,  # out [Hkv, bq * G, D]; pool [num_pages, page_size, 2*Hkv, D]
    kv_buf, sems, write_sem, state_ref, m_ref, l_ref, acc_ref,  # scratch
    *, geo: kvs.Geometry, block_q: int, group: int, sm_scale, sliding_window, soft_cap,
):
    blk, num_blks = pl.program_id(0), pl.num_programs(0)
    max_seqs = kv_lens_ref.shape[0]
    num_seqs = jnp.minimum(num_seqs_ref[0], max_seqs)

    def rows_of(b, seq):
        """Live query rows `[r_lo, r_hi)` of `seq` in block `b`, and position = offset + row."""
        seq = jnp.minimum(seq, max_seqs - 1)
        kv_len, q_end = kv_lens_ref[seq], cu_ref[seq + 1]
        r_lo = jnp.maximum(jnp.maximum(cu_ref[seq], b * block_q), q_end - kv_len)
        r_hi = jnp.minimum(q_end, (b + 1) * block_q)
        return r_lo, r_hi, kv_len - q_end, kv_len

    def item_of(b, seq):
        r_lo, r_hi, offset, kv_len = rows_of(b, seq)
        live = (seq < num_seqs) & (b < num_blks) & (kv_len > 0) & (r_lo < r_hi)
        return kvs.make_item(geo, jnp.minimum(seq, max_seqs - 1), live, offset + r_lo,
                             offset + r_hi - 1, sliding_window)

    def in_block(b, seq):
        return (seq < num_seqs) & (cu_ref[jnp.minimum(seq, max_seqs)] < (b + 1) * block_q)

    @pl.when(blk == 0)
    def _():
        kvs.init_stream_state(state_ref)
        _write_new_tokens(geo, kv_lens_ref, pages_ref, cu_ref, new_kv_hbm, pool_hbm, write_sem,
                          num_seqs)

    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
    refs = (pages_ref, pool_hbm, kv_buf, sems)
    row_token = kvs.row_tokens(blk * block_q, block_q * group, group)

    def run_seq(seq):
        r_lo, r_hi, offset, kv_len = rows_of(blk, seq)
        next_blk_first = first_seq_ref[jnp.minimum(blk + 1, num_blks - 1)]
        successor = item_of(blk, seq + 1).where(
            in_block(blk, seq + 1), item_of(blk + 1, next_blk_first))
        kvs.attend_item(geo, refs, (m_ref, l_ref, acc_ref), state_ref, item_of(blk, seq),
                        successor, q_ref, o_ref, offset + row_token,
                        (row_token >= r_lo) & (row_token < r_hi), kv_len,
                        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
        return seq + 1

    lax.while_loop(lambda seq: in_block(blk, seq), run_seq, first_seq_ref[blk])


def query_block(requested: int, num_tokens: int, group: int) -> int:
    """Query tokens per grid step: `requested`, rounded up so that a block's `tokens * group`
    query rows are whole sublane tiles (Mosaic tiles the second-minor dimension of the `[Hkv,
    rows, D]` query block by 8, packed dtypes included), or every token in one block, which
    needs no alignment."""
    step = kvs.SUBLANES // math.gcd(kvs.SUBLANES, group)
    block = -(-requested // step) * step
    return num_tokens if block >= num_tokens else block


def mixed_attention(q, new_kv, kv_pages, kv_lens, pages_flat, cu_q_lens, num_seqs, *, geo,
                    block_q, sm_scale, sliding_window, soft_cap, vmem_limit_bytes):
    """q `[T, Hq, D]`, new_kv `[T, 2*Hkv, D]` (pool dtype) -> (out `[T, Hq, D]`, kv_pages)."""
    num_tokens, num_q_heads, head_dim = q.shape
    hkv = geo.num_kv_heads
    group = num_q_heads // hkv
    block_q = query_block(block_q, num_tokens, group)
    num_blks = pl.cdiv(num_tokens, block_q)
    padded = num_blks * block_q
    qt = jnp.pad(q, ((0, padded - num_tokens), (0, 0), (0, 0)))
    qt = qt.reshape(padded, hkv, group, head_dim).transpose(1, 0, 2, 3)
    qt = qt.reshape(hkv, padded * group, head_dim)
    # First sequence whose rows reach each block (num_seqs or past when none).
    starts = jnp.arange(num_blks, dtype=jnp.int32) * block_q
    first_seq = jnp.searchsorted(cu_q_lens[1:], starts, side="right").astype(jnp.int32)

    rows = block_q * group
    kernel = functools.partial(_mixed_kernel, geo=geo, block_q=block_q, group=group,
                               sm_scale=sm_scale, sliding_window=sliding_window,
                               soft_cap=soft_cap)
    out, kv_pages = kvs.stream_call(
        kernel, (kv_lens, pages_flat, cu_q_lens, num_seqs, first_seq), qt, new_kv, kv_pages,
        geo=geo, grid=(num_blks,), softmax_rows=(hkv, rows),
        q_spec=pl.BlockSpec((hkv, rows, head_dim), lambda b, *_: (0, b, 0)),
        vmem_limit_bytes=vmem_limit_bytes, name="rpa_mixed",
        # Work items: every block once, plus one more per sequence boundary inside a block.
        cost=kvs.cost_estimate(geo, items=num_blks + min(kv_lens.shape[0], num_tokens) - 1,
                               rows_per_item=block_q, q=q, new_kv=new_kv, kv_pages=kv_pages,
                               window=sliding_window, soft_cap=soft_cap))
    out = out.reshape(hkv, padded, group, head_dim).transpose(1, 0, 2, 3)
    return out.reshape(padded, num_q_heads, head_dim)[:num_tokens], kv_pages
