"""TPU decode kernel: one query token per sequence, `T == S`, row `s` belongs to sequence `s`.

Grid `(S,)`, sequential. Step `s` gets the query block `[Hkv, G, D]` (all `G = Hq / Hkv` query
heads of each kv head together) and streams sequence `s`'s KV blocks (window start to its last
token) through `tpu_kv_stream`; the next sequence's first block is fetched while this one's last
block is computed. Step 0 first writes every sequence's new token into its page: one
`[2*Hkv, D]` DMA per sequence, all in flight at once, all waited before any KV is fetched.

Knows nothing about mixed batches: `cu_q_lens` is not read (the caller promised `arange`).
"""

from __future__ import annotations

import functools

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
    q_ref, new_kv_hbm, _pool_in,  # q [Hkv, G, D]; new K/V [S, 2*Hkv, D]; the aliased pool
    o_ref, pool_hbm,  # out [Hkv, G, D]; pool [num_pages, page_size, 2*Hkv, D]
    kv_buf, sems, write_sem, state_ref, m_ref, l_ref, acc_ref,  # scratch
    *, geo: kvs.Geometry, sm_scale, sliding_window, soft_cap,
):
    step, num_rows = pl.program_id(0), pl.num_programs(0)
    num_seqs = jnp.minimum(num_seqs_ref[0], num_rows)

    def item_of(seq):
        seq = jnp.minimum(seq, num_rows - 1)
        kv_len = kv_lens_ref[seq]
        live = (seq < num_seqs) & (kv_len > 0)
        return kvs.make_item(geo, seq, live, kv_len - 1, kv_len - 1, sliding_window)

    @pl.when(step == 0)
    def _():
        kvs.init_stream_state(state_ref)
        _write_new_tokens(geo, kv_lens_ref, pages_ref, new_kv_hbm, pool_hbm, write_sem, num_seqs)

    kv_len = kv_lens_ref[step]
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
    kvs.attend_item(geo, (pages_ref, pool_hbm, kv_buf, sems), (m_ref, l_ref, acc_ref),
                    state_ref, item_of(step), item_of(step + 1), q_ref, o_ref, kv_len - 1, True,
                    kv_len, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)


def decode_attention(q, new_kv, kv_pages, kv_lens, pages_flat, num_seqs, *, geo, sm_scale,
                     sliding_window, soft_cap, vmem_limit_bytes):
    """q `[S, Hq, D]`, new_kv `[S, 2*Hkv, D]` (pool dtype) -> (out `[S, Hq, D]`, kv_pages)."""
    num_rows, num_q_heads, head_dim = q.shape
    hkv = geo.num_kv_heads
    group = num_q_heads // hkv
    kernel = functools.partial(_decode_kernel, geo=geo, sm_scale=sm_scale,
                               sliding_window=sliding_window, soft_cap=soft_cap)
    out, kv_pages = kvs.stream_call(
        kernel, (kv_lens, pages_flat, num_seqs), q.reshape(num_rows, hkv, group, head_dim),
        new_kv, kv_pages, geo=geo, grid=(num_rows,), softmax_rows=(hkv, group),
        q_spec=pl.BlockSpec((None, hkv, group, head_dim), lambda s, *_: (s, 0, 0, 0)),
        vmem_limit_bytes=vmem_limit_bytes, name="rpa_decode",
        cost=kvs.cost_estimate(geo, items=num_rows, rows_per_item=1, q=q, new_kv=new_kv,
                               kv_pages=kv_pages, window=sliding_window, soft_cap=soft_cap))
    return out.reshape(q.shape), kv_pages
