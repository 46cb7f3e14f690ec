"""The reference ragged paged attention against a dense numpy oracle written independently:
mixed prefill + decode batches, GQA/MQA, sliding window, soft-cap, page isolation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ragged_paged_attention, resolve_backend
from tests.attention_cases import check, make_case


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1), (16, 2)])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_mixed_prefill_decode(hq, hkv, d):
    # decode rows (q_len 1), a fresh prefill, a chunk on top of context, a 1-token prompt,
    # lengths ending mid-page and on page boundaries.
    seqs = [(37, 1), (0, 21), (16, 16), (0, 1), (5, 1), (31, 9)]
    check(seqs, hq, hkv, d, page_size=16, seed=d + hq)


@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("window,soft_cap", [(None, None), (7, None), (None, 20.0), (16, 30.0)])
def test_window_and_softcap(page_size, window, soft_cap):
    seqs = [(70, 1), (0, 40), (50, 13), (3, 1)]
    check(seqs, 8, 2, 64, page_size, window=window, soft_cap=soft_cap, seed=page_size)


def test_bf16_pool():
    check([(40, 1), (0, 18), (17, 3)], 8, 1, 128, 16, window=24, dtype=jnp.bfloat16)


def test_idle_row_reads_and_writes_nothing():
    rng = np.random.default_rng(1)
    args, _ = make_case(rng, [(20, 1)], 4, 2, 64, 16, jnp.float32)
    q, k, v, pool, kv_lens, page_indices, cu, num_seqs = args
    # Row 1 is idle (kv_len 0) but points at real pages: they must stay untouched.
    page_indices = page_indices.at[1].set(page_indices[0])
    out, new_pool = ragged_paged_attention(q, k, v, pool, kv_lens, page_indices, cu, num_seqs,
                                           sm_scale=0.125, backend="reference")
    before, after = np.asarray(pool), np.asarray(new_pool)
    changed = ~((before == after) | (np.isnan(before) & np.isnan(after)))
    assert changed.sum() == 2 * 64 * 2  # exactly one token's K and V for 2 kv heads
    assert np.isfinite(np.asarray(out)).all()


def test_backend_validation():
    assert resolve_backend("auto", "cpu") == "xla"  # the blocked plain-XLA path
    assert resolve_backend("auto", "metal") == "reference"  # any other platform
    with pytest.raises(ValueError, match="attention backend='nope'"):
        resolve_backend("nope")


def test_idle_slot_with_query_rows_is_ignored():
    """Decode batches give every slot one query row; an idle slot (kv_len 0) must not write."""
    rng = np.random.default_rng(2)
    args, _ = make_case(rng, [(20, 1), (9, 1)], 4, 2, 64, 16, jnp.float32, pad_rows=0)
    q, k, v, pool, kv_lens, page_indices, cu, num_seqs = args
    kv_lens = kv_lens.at[1].set(0)  # slot 1 idle but still owns a query row
    out, new_pool = ragged_paged_attention(q, k, v, pool, kv_lens, page_indices, cu, num_seqs,
                                           sm_scale=0.125, backend="reference")
    before, after = np.asarray(pool), np.asarray(new_pool)
    changed = ~((before == after) | (np.isnan(before) & np.isnan(after)))
    assert changed.sum() == 2 * 64 * 2  # only slot 0's token
    assert np.all(np.asarray(out)[1] == 0)


@pytest.mark.parametrize("window", [None, 5])
def test_decode_only_path(window):
    """decode_only=True (row s is sequence s) gives the oracle's answer, idle row included."""
    check([(0, 1), (15, 1), (16, 1), (70, 1)], 8, 2, 64, 16, window=window, decode_only=True)


def test_decode_layout_equals_token_layout_on_a_decode_step():
    from pallas_kernels.ragged_paged_attention.reference import decode_layout, token_layout

    kv_lens = jnp.array([5, 0, 17, 1, 9], jnp.int32)  # an idle slot, and row 4 past num_seqs
    num_seqs = jnp.array([4], jnp.int32)
    cu = jnp.arange(6, dtype=jnp.int32)
    for got, want in zip(decode_layout(kv_lens, num_seqs), token_layout(cu, kv_lens, num_seqs, 5)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
