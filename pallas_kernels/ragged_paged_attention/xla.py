"""Blocked ragged paged attention in plain XLA: the CPU path ("auto" on CPU).

The reference gathers every page of a sequence's page-table row for every query token, so its
cost grows with `pages_per_seq` (the server's max_model_len), not with the context: at
max_model_len 2048 a Gemma 3 270M decode step on the 2-core CPU box spent most of its time
copying empty pages. Here the work is the GPU kernels' shape, written with `lax` ops:

- query rows are cut into work blocks of `block_q` rows of one sequence (`work_list`; a decode
  step is one block of one row per sequence; a step whose sequences have at most `max_q_len`
  rows, such as a speculative verify step, one block of `max_q_len` rows per sequence, so its
  few rows are not padded to `block_q`), so a block's keys are gathered once for all its rows
  and query heads (GQA: the G heads of a KV head share them);
- a loop runs over key blocks of `pages_per_block` pages, from the first block any live row can
  see (the sliding window's start) to the block of the last live position, with an online
  softmax in f32 — nothing past the longest live context, or before the window, is read;
- keys at or past the sequence's `kv_len` (a page's unwritten tail, the null page padding the
  table) are zeroed before use and masked, so NaN or foreign data never reaches an output.

The step's new K/V are written first (`write_kv`, an in-place scatter into the donated pool).
Compared against the reference in `tests/test_attention_xla.py`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.reference import (decode_layout, token_layout, work_list,
                                                             write_kv)

_MASK = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class XlaBlockSizes:
    pages_per_block: int = 8  # pages per key block (keys per block = this x page_size)
    block_q: int = 16  # query rows per work block in a mixed (prefill) step


def _attend(qw, wseq, wpos, wlive, kv_pages, kv_lens, page_indices, *, sm_scale, window,
            soft_cap, pages_per_block):
    """Work blocks `qw [W, R, Hkv, G, D]` (f32) of sequences `wseq i32[W]`, row positions
    `wpos i32[W, R]`, live rows `wlive bool[W, R]` -> `[W, R, Hkv, G, D]` f32 (0 for dead rows)."""
    _, page_size, two_hkv, d = kv_pages.shape
    hkv = two_hkv // 2
    w, r = wpos.shape
    block_k = pages_per_block * page_size
    num_blocks = -(-page_indices.shape[1] // pages_per_block)
    table = jnp.pad(page_indices, ((0, 0), (0, num_blocks * pages_per_block -
                                            page_indices.shape[1])))[wseq]  # [W, blocks*ppb]
    written = kv_lens[wseq]  # [W] keys below this are the sequence's own, written data
    hi = jnp.max(jnp.where(wlive, wpos, -1))  # last position any live row sees
    lo = jnp.zeros_like(wpos) if window is None else jnp.maximum(wpos - window + 1, 0)
    lo = jnp.min(jnp.where(wlive, lo, hi))
    first, last = lo // block_k, hi // block_k

    def body(i, carry):
        o, m, l = carry
        b = first + i
        pages = jax.lax.dynamic_slice_in_dim(table, b * pages_per_block, pages_per_block, axis=1)
        kv = kv_pages[pages].reshape(w, block_k, hkv, 2, d).astype(jnp.float32)
        kpos = b * block_k + jnp.arange(block_k)
        own = (kpos[None, :] < written[:, None])[:, :, None, None]  # [W, K, 1, 1]
        keys = jnp.where(own, kv[:, :, :, 0], 0.0)
        values = jnp.where(own, kv[:, :, :, 1], 0.0)
        s = jnp.einsum("wrhgd,wkhd->wrhgk", qw, keys) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        visible = (kpos[None, None, :] <= wpos[:, :, None]) & wlive[:, :, None]  # [W, R, K]
        if window is not None:
            visible &= kpos[None, None, :] > wpos[:, :, None] - window
        visible = visible[:, :, None, None, :]
        s = jnp.where(visible, s, _MASK)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        o = alpha[..., None] * o + jnp.einsum("wrhgk,wkhd->wrhgd", p, values)
        return o, m_new, alpha * l + p.sum(axis=-1)

    g = qw.shape[3]
    init = (jnp.zeros((w, r, hkv, g, d), jnp.float32), jnp.full((w, r, hkv, g), _MASK, jnp.float32),
            jnp.zeros((w, r, hkv, g), jnp.float32))
    n = jnp.where(hi >= 0, last - first + 1, 0)
    o, _, l = jax.lax.fori_loop(0, n, body, init)
    return jnp.where(l[..., None] > 0, o / jnp.where(l > 0, l, 1.0)[..., None], 0.0)


def ragged_paged_attention(q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale: float, sliding_window: int | None = None,
                           soft_cap: float | None = None, decode_only: bool = False,
                           max_q_len: int | None = None,
                           block_sizes: XlaBlockSizes | None = None):
    """Blocked XLA backend; see `pallas_kernels.ragged_paged_attention` for the contract."""
    blocks = block_sizes or XlaBlockSizes()
    t, hq, d = q.shape
    hkv = kv_pages.shape[2] // 2
    g = hq // hkv
    s = kv_lens.shape[0]
    if decode_only:
        seq, pos, live = decode_layout(kv_lens, num_seqs)
    else:
        seq, pos, live = token_layout(cu_q_lens, kv_lens, num_seqs, t)
    kv_pages = write_kv(kv_pages, k, v, seq, pos, live, page_indices)
    common = dict(sm_scale=sm_scale, window=sliding_window, soft_cap=soft_cap,
                  pages_per_block=blocks.pages_per_block)
    qf = q.astype(jnp.float32).reshape(t, hkv, g, d)
    if decode_only:  # one block per sequence, of its one row
        out = _attend(qf[:, None], seq, pos[:, None], live[:, None], kv_pages, kv_lens,
                      page_indices, **common)[:, 0]
    else:
        bq = blocks.block_q
        num_work = -(-t // bq) + s  # a sequence's rows may straddle blocks
        if max_q_len is not None and max_q_len <= bq:  # e.g. a verify step's 1 + K rows
            bq, num_work = max_q_len, s  # one block per sequence, as long as its longest
        work, starts = work_list(cu_q_lens, kv_lens, num_seqs, num_work, bq)
        rows = work[:, :1] + jnp.arange(bq)[None, :]  # [W, R] packed query row of each slot
        wlive = jnp.arange(bq)[None, :] < work[:, 1:2]
        qw = jnp.pad(qf, ((0, bq), (0, 0), (0, 0), (0, 0)))[jnp.where(wlive, rows, t)]
        ow = _attend(qw, work[:, 3], work[:, 2:3] + jnp.arange(bq)[None, :], wlive, kv_pages,
                     kv_lens, page_indices, **common)
        # Back to packed rows: row i of sequence s sits in block starts[s] + local // bq.
        local = jnp.arange(t) - cu_q_lens[seq]
        blk = jnp.where(live, starts[seq] + local // bq, 0)
        out = jnp.where(live[:, None, None, None], ow[blk, local % bq], 0.0)
    return out.reshape(t, hq, d).astype(q.dtype), kv_pages
