"""Incremental decoding over pages equals one full forward: prefill N tokens, then decode one
token at a time, several sequences of different lengths interleaved in one batch, pages
scattered across the pool and partly filled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.models import Model
from tests.helpers import TINY_GEMMA3, TINY_LLAMA, full_forward_logits, packed_metadata


@pytest.mark.parametrize("cfg", [TINY_GEMMA3, TINY_LLAMA], ids=["gemma3", "llama"])
def test_prefill_then_decode_matches_full_forward(cfg):
    model = Model(cfg)
    params = model.init_random(seed=3)
    rng = np.random.default_rng(0)
    page_size = 16
    lengths = [29, 7, 18]  # total tokens per sequence (sliding window is 12 for gemma)
    prefill_lens = [20, 1, 16]  # partly filled pages; one page boundary
    seqs = [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]
    pages_per_seq = 3
    pool_pages = 1 + len(seqs) * pages_per_seq + 4
    page_indices = rng.permutation(np.arange(1, pool_pages))[: len(seqs) * pages_per_seq]
    page_indices = page_indices.reshape(len(seqs), pages_per_seq)
    pages = model.init_kv_pages(pool_pages, page_size)
    fwd = jax.jit(model.forward)

    got = [[] for _ in seqs]
    # Prefill: all prompts packed into one call.
    tokens = np.concatenate([s[:n] for s, n in zip(seqs, prefill_lens)])
    positions = np.concatenate([np.arange(n) for n in prefill_lens])
    md = packed_metadata([(n, n) for n in prefill_lens], page_indices)
    logits, pages = fwd(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32),
                        pages, md)
    logits = np.asarray(logits)
    offsets = np.concatenate([[0], np.cumsum(prefill_lens)])
    for s in range(len(seqs)):
        got[s].extend(logits[offsets[s]:offsets[s + 1]])
    # Decode: one token per still-running sequence per step (rows keep their slot).
    cur = list(prefill_lens)
    while any(c < n for c, n in zip(cur, lengths)):
        rows = [s for s in range(len(seqs)) if cur[s] < lengths[s]]
        step_tokens = np.array([seqs[s][cur[s]] for s in rows] + [0] * (len(seqs) - len(rows)))
        step_pos = np.array([cur[s] for s in rows] + [0] * (len(seqs) - len(rows)))
        # Pad the page table rows to a fixed shape; idle rows have kv_len 0.
        table = np.zeros_like(page_indices)
        table[: len(rows)] = page_indices[rows]
        md = packed_metadata([(cur[s] + 1, 1) for s in rows], table, rows=len(seqs))
        logits, pages = fwd(params, jnp.asarray(step_tokens, jnp.int32),
                            jnp.asarray(step_pos, jnp.int32), pages, md)
        logits = np.asarray(logits)
        for i, s in enumerate(rows):
            got[s].append(logits[i])
            cur[s] += 1

    for s, ids in enumerate(seqs):
        want = full_forward_logits(model, params, ids, page_size)
        np.testing.assert_allclose(np.stack(got[s]), want, rtol=1e-4,
                                   atol=1e-4 * np.abs(want).max())
