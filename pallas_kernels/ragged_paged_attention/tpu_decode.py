"""TPU decode kernel: one query token per sequence, `T == S`, row `s` belongs to sequence `s`.

Grid `(S,)`, sequential. Step `s` gets the query block `[1, Hkv, G, D]` (all `G = Hq / Hkv` query
heads of each kv head together) and streams sequence `s`'s KV blocks (window start to its last
token) through `tpu_kv_stream`; the next sequence's first block is fetched while this one's last
block is computed. Step 0 first writes every sequence's new token into its page: one
`[2*Hkv, D]` DMA per sequence, all in flight at once, all waited before any KV is fetched.

Knows nothing about mixed batches: `cu_q_lens` is not read (the caller promised `arange`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ragged_paged_attention import tpu_kv_stream as kvs


def _write_new_tokens(geo, kv_lens_ref, pages_ref, new_kv_hbm, pool_hbm, sem, num_seqs):
    for wait in (False, True):
        def body(s, carry):
            kv_len = kv_lens_ref[s]

            @pl.when(kv_len > 0)
            def _():
                page = jnp.minimum((kv_len - 1) // geo.page_size, geo.pages_per_seq - 1)
                page_id = pages_ref[s * geo.pages_per_seq + page]
                copy = pltpu.make_async_copy(
                    new_kv_hbm.at[s], pool_hbm.at[page_id, (kv_len - 1) % geo.page_size], sem)
                (copy.wait if wait else copy.start)()
            return carry

        lax.fori_loop(0, num_seqs, body, 0)


def _decode_kernel(
    kv_lens_ref, pages_ref, num_seqs_ref,  # scalar prefetch (SMEM)
    q_ref, new_kv_hbm, _pool_in,  # q [1, Hkv, G, D]; new K/V [S, 2*Hkv, D]; the aliased pool
    o_ref, pool_hbm,  # out [1, Hkv, G, D]; pool [num_pages, page_size, 2*Hkv, D]
    k_buf, v_buf, sems, write_sem, state_ref, m_ref, l_ref, acc_ref,  # scratch
    *, geo: kvs.Geometry, sm_scale, sliding_window, soft_cap,
):
    step, num_rows = pl.program_id(0), pl.num_programs(0)
    num_seqs = jnp.minimum(num_seqs_ref[0], num_rows)

    def item_of(seq):
        kv_len = kv_lens_ref[jnp.minimum(seq, num_rows - 1)]
        live = (seq < num_seqs) & (kv_len > 0)
        item = kvs.make_item(geo, jnp.minimum(seq, num_rows - 1), live, kv_len - 1, kv_len - 1,
                             sliding_window)
        return item, kv_len

    @pl.when(step == 0)
    def _():
        kvs.init_stream_state(state_ref)
        _write_new_tokens(geo, kv_lens_ref, pages_ref, new_kv_hbm, pool_hbm, write_sem, num_seqs)

    item, kv_len = item_of(step)
    successor, _ = item_of(step + 1)
    pos = kv_len - 1
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    @pl.when(item.num_blocks > 0)
    def _():
        kvs.init_softmax(m_ref, l_ref, acc_ref)

    def compute(block, slot):
        key_pos = kvs.key_positions(geo, item, block)
        visible = key_pos <= pos  # rows past kv_len, stale or NaN, are never visible
        if sliding_window is not None:
            visible &= key_pos > pos - sliding_window
        key_valid = kvs.written_rows(geo, item, block, kv_len)
        for h in range(geo.num_kv_heads):
            kvs.update_softmax(q_ref[0, h], k_buf[slot, h], v_buf[slot, h], visible, key_valid,
                               m_ref.at[h], l_ref.at[h], acc_ref.at[h],
                               sm_scale=sm_scale, soft_cap=soft_cap)

    refs = (pages_ref, pool_hbm, k_buf, v_buf, sems)
    kvs.run_item(geo, refs, state_ref, item, successor, compute)

    @pl.when(item.num_blocks > 0)
    def _():
        for h in range(geo.num_kv_heads):
            o_ref[0, h] = kvs.finish_softmax(l_ref.at[h], acc_ref.at[h]).astype(o_ref.dtype)


def decode_attention(q, new_kv, kv_pages, kv_lens, pages_flat, num_seqs, *, geo, sm_scale,
                     sliding_window, soft_cap, vmem_limit_bytes):
    """q `[S, Hq, D]`, new_kv `[S, 2*Hkv, D]` (pool dtype) -> (out `[S, Hq, D]`, kv_pages)."""
    num_rows, num_q_heads, head_dim = q.shape
    hkv = geo.num_kv_heads
    group = num_q_heads // hkv
    q4 = q.reshape(num_rows, hkv, group, head_dim)
    q_spec = pl.BlockSpec((1, hkv, group, head_dim), lambda s, *_: (s, 0, 0, 0))
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    buf = pltpu.VMEM((2, hkv, geo.block_tokens, head_dim), kv_pages.dtype)
    scratch = [
        buf, buf,
        pltpu.SemaphoreType.DMA((2,)),
        pltpu.SemaphoreType.DMA(()),
        pltpu.SMEM((kvs.STATE_SIZE,), jnp.int32),
        pltpu.VMEM((hkv, group, kvs.LANES), jnp.float32),
        pltpu.VMEM((hkv, group, kvs.LANES), jnp.float32),
        pltpu.VMEM((hkv, group, head_dim), jnp.float32),
    ]
    kernel = functools.partial(_decode_kernel, geo=geo, sm_scale=sm_scale,
                               sliding_window=sliding_window, soft_cap=soft_cap)
    out, kv_pages = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(num_rows,),
            in_specs=[q_spec, any_spec, any_spec], out_specs=[q_spec, any_spec],
            scratch_shapes=scratch),
        out_shape=[jax.ShapeDtypeStruct(q4.shape, q.dtype),
                   jax.ShapeDtypeStruct(kv_pages.shape, kv_pages.dtype)],
        input_output_aliases={5: 1},  # operand 5 = the pool (after 3 scalar-prefetch operands)
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("arbitrary",), vmem_limit_bytes=vmem_limit_bytes),
        name="rpa_decode",
    )(kv_lens, pages_flat, num_seqs, q4, new_kv, kv_pages)
    return out.reshape(q.shape), kv_pages
