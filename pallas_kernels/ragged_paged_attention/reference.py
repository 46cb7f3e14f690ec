"""Plain-jnp ragged paged attention: the oracle for every kernel and the CPU path.

Clarity first: each query token gathers its own sequence's pages and runs a masked softmax in
f32. Tokens are processed in blocks (`lax.map` with a batch size) so a long prefill chunk does not
materialise one copy of the context per token all at once. Shapes and semantics are documented
on `pallas_kernels.ragged_paged_attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Query tokens handled per vectorised block; bounds the gathered context to
# TOKEN_BLOCK * pages_per_seq * page_size rows per layer.
TOKEN_BLOCK = 64


def token_layout(cu_q_lens, kv_lens, num_seqs, num_tokens: int):
    """Per packed query row: (sequence id, position in its sequence, is-live) as `i32[T]` x2, `bool[T]`."""
    num_seqs = jnp.reshape(num_seqs, ())
    rows = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_q_lens[1:], rows, side="right").astype(jnp.int32)
    live = (rows < cu_q_lens[num_seqs]) & (seq < num_seqs)
    seq = jnp.minimum(seq, kv_lens.shape[0] - 1)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = kv_lens[seq] - q_len + (rows - cu_q_lens[seq])
    # A sequence with kv_len 0 (an idle slot) is ignored even if it has query rows.
    live &= (kv_lens[seq] > 0) & (pos >= 0)
    return seq, jnp.where(live, pos, 0), live


def decode_layout(kv_lens, num_seqs):
    """`token_layout` of a decode step (row s is sequence s, one query each), without the
    search over `cu_q_lens`."""
    seq = jnp.arange(kv_lens.shape[0], dtype=jnp.int32)
    live = (seq < jnp.reshape(num_seqs, ())) & (kv_lens > 0)
    return seq, jnp.where(live, kv_lens - 1, 0), live


def work_list(cu_q_lens, kv_lens, num_seqs, num_blocks: int, block_q: int):
    """Cuts each live sequence's query rows into blocks of `block_q` (the blocked backends' unit
    of work): `i32[num_blocks, 4]` rows (first query row, live rows, position of the first row,
    sequence), plus each sequence's first block index `i32[S]`. `num_blocks` must be at least
    `cdiv(T, block_q) + S`; blocks past the last are empty (0 live rows)."""
    s = kv_lens.shape[0]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    live = (jnp.arange(s) < jnp.reshape(num_seqs, ())) & (kv_lens > 0)
    q_lens = jnp.where(live, q_lens, 0)
    per_seq = (q_lens + block_q - 1) // block_q
    ends = jnp.cumsum(per_seq)
    starts = ends - per_seq
    b = jnp.arange(num_blocks)
    seq = jnp.minimum(jnp.searchsorted(ends, b, side="right"), s - 1)
    local = (b - starts[seq]) * block_q
    n_rows = jnp.where(b < ends[-1], jnp.clip(q_lens[seq] - local, 0, block_q), 0)
    pos0 = kv_lens[seq] - q_lens[seq] + local
    work = jnp.stack([cu_q_lens[seq] + local, n_rows, pos0, seq], axis=1).astype(jnp.int32)
    return work, starts


def write_kv(kv_pages, k, v, seq, pos, live, page_indices):
    """Scatters new K/V (`[T, Hkv, D]`) into `kv_pages` at each live row's (page, offset)."""
    num_pages, page_size = kv_pages.shape[:2]
    t, hkv, d = k.shape
    page = page_indices[seq, pos // page_size]
    page = jnp.where(live, page, num_pages)  # out of range: dropped by the scatter
    kv = jnp.stack([k, v], axis=2).reshape(t, 2 * hkv, d).astype(kv_pages.dtype)
    return kv_pages.at[page, pos % page_size].set(kv, mode="drop")


def _attend_one(q, seq, pos, live, kv_pages, page_indices, sm_scale, sliding_window, soft_cap):
    """One query row: q `[Hq, D]` against its sequence's first `pos + 1` tokens."""
    _, page_size, two_hkv, d = kv_pages.shape
    hkv = two_hkv // 2
    hq = q.shape[0]
    ctx = kv_pages[page_indices[seq]]  # [P, page_size, 2*Hkv, D]
    ctx = ctx.reshape(-1, hkv, 2, d).astype(jnp.float32)
    keys, values = ctx[:, :, 0], ctx[:, :, 1]  # [L, Hkv, D]
    kv_pos = jnp.arange(keys.shape[0])
    visible = (kv_pos <= pos) & live
    if sliding_window is not None:
        visible &= kv_pos > pos - sliding_window
    # Unwritten or foreign rows may hold anything (NaN included): zero them, don't just mask.
    keys = jnp.where(visible[:, None, None], keys, 0.0)
    values = jnp.where(visible[:, None, None], values, 0.0)
    qg = q.astype(jnp.float32).reshape(hkv, hq // hkv, d)
    scores = jnp.einsum("hgd,lhd->hgl", qg, keys) * sm_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    scores = jnp.where(visible[None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(live, probs, 0.0)  # padding rows: all -inf would give NaN
    out = jnp.einsum("hgl,lhd->hgd", probs, values)
    return out.reshape(hq, d).astype(q.dtype)


def ragged_paged_attention(
    q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
    *, sm_scale: float, sliding_window: int | None = None, soft_cap: float | None = None,
    decode_only: bool = False, max_q_len: int | None = None, block_sizes=None,
):
    """Reference implementation; see `pallas_kernels.ragged_paged_attention` for the contract.
    `max_q_len` and `block_sizes` are accepted for a uniform signature and ignored."""
    del block_sizes
    if decode_only:
        seq, pos, live = decode_layout(kv_lens, num_seqs)
    else:
        seq, pos, live = token_layout(cu_q_lens, kv_lens, num_seqs, q.shape[0])
    kv_pages = write_kv(kv_pages, k, v, seq, pos, live, page_indices)

    def attend(row):
        return _attend_one(*row, kv_pages, page_indices, sm_scale, sliding_window, soft_cap)

    out = jax.lax.map(attend, (q, seq, pos, live), batch_size=TOKEN_BLOCK)
    return out, kv_pages
