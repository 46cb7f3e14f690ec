"""Shared ragged-paged-attention test cases: a float64 dense oracle written independently of
every backend, random page pools with unlisted pages poisoned with NaN, and `check`, which runs
one backend on a case and compares outputs and the fused K/V write with the oracle."""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import ragged_paged_attention


# Shared step shapes: decode rows, a fresh prefill, a chunk on top of context, a 1-token
# prompt, lengths that end mid-page and on page boundaries; GQA 1, 4, 8 and MQA.
MIXED = [(37, 1), (0, 21), (16, 16), (0, 1), (5, 1), (31, 9)]
DECODE = [(0, 1), (15, 1), (16, 1), (70, 1), (33, 1)]
HEADS = [(4, 4), (16, 4), (16, 2), (8, 1)]
# (window, soft_cap) against 70-130-token contexts: whole key blocks fall outside the window.
WINDOW_SOFTCAP = [(None, None), (7, None), (None, 20.0), (40, 30.0)]


def window_seqs(decode_only: bool):
    return [(130, 1), (0, 1), (50, 1)] if decode_only else [(130, 1), (0, 40), (50, 13), (3, 1)]


def block_seqs(decode_only: bool):
    """(seqs, window) of the block-size tests: long and short contexts, a window on mixed."""
    if decode_only:
        return [(200, 1), (7, 1), (64, 1)], None
    return [(200, 1), (0, 45), (64, 33)], 50


def bf16_seqs(decode_only: bool):
    return [(40, 1), (90, 1)] if decode_only else [(40, 1), (0, 18), (17, 3)]


def dense_oracle(q, k_ctx, v_ctx, q_pos, sm_scale, window, soft_cap):
    """q `[Q, Hq, D]` at positions `q_pos`, context `[L, Hkv, D]` -> `[Q, Hq, D]` (float64)."""
    hq, hkv = q.shape[1], k_ctx.shape[1]
    k = np.repeat(k_ctx, hq // hkv, axis=1).astype(np.float64)
    v = np.repeat(v_ctx, hq // hkv, axis=1).astype(np.float64)
    s = np.einsum("qhd,lhd->hql", q.astype(np.float64), k) * sm_scale
    if soft_cap:
        s = soft_cap * np.tanh(s / soft_cap)
    kv_pos = np.arange(k.shape[0])
    mask = kv_pos[None, :] <= q_pos[:, None]
    if window:
        mask &= kv_pos[None, :] > q_pos[:, None] - window
    s = np.where(mask[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hql,lhd->qhd", p, v)


def make_case(rng, seqs, hq, hkv, d, page_size, dtype, pages_per_seq=None, pad_rows=3):
    """Random pool + a step over `seqs` = [(context_before, q_len)]; unlisted pages are NaN."""
    pages_per_seq = pages_per_seq or max(-(-(c + q) // page_size) for c, q in seqs) + 1
    num_pages = 2 + len(seqs) * pages_per_seq
    perm = rng.permutation(np.arange(1, num_pages))  # pages scattered across the pool
    page_indices = perm[: len(seqs) * pages_per_seq].reshape(len(seqs), pages_per_seq)
    pool = np.full((num_pages, page_size, 2 * hkv, d), np.nan, np.float32)
    contexts = []
    for s, (ctx, q_len) in enumerate(seqs):
        kv = rng.standard_normal((ctx, 2 * hkv, d)).astype(np.float32)
        for p in range(ctx):
            pool[page_indices[s, p // page_size], p % page_size] = kv[p]
        contexts.append(kv)
    t = sum(q for _, q in seqs)
    q = rng.standard_normal((t + pad_rows, hq, d)).astype(np.float32)
    k = rng.standard_normal((t + pad_rows, hkv, d)).astype(np.float32)
    v = rng.standard_normal((t + pad_rows, hkv, d)).astype(np.float32)
    kv_lens = np.array([c + ql for c, ql in seqs] + [0], np.int32)  # one idle row
    cu = np.concatenate([[0], np.cumsum([ql for _, ql in seqs]), [t]]).astype(np.int32)
    page_indices = np.concatenate([page_indices, np.zeros((1, pages_per_seq), int)]).astype(np.int32)
    args = (q, k, v, pool, kv_lens, page_indices, cu, np.array([len(seqs)], np.int32))
    return [jnp.asarray(a, dtype if i < 4 else None) for i, a in enumerate(args)], contexts


def check(seqs, hq, hkv, d, page_size, window=None, soft_cap=None, dtype=jnp.float32, seed=0,
          backend="reference", tol=None, jit=True, pages_per_seq=None, **kwargs):
    """Runs `ragged_paged_attention` (any backend, extra kwargs passed on) on a random case and
    compares outputs and the fused K/V write with the float64 oracle."""
    rng = np.random.default_rng(seed)
    if kwargs.get("decode_only"):
        # A decode step: one query row per sequence row, the idle row's included (T == S).
        assert all(q_len == 1 for _, q_len in seqs)
        args, contexts = make_case(rng, seqs, hq, hkv, d, page_size, dtype, pages_per_seq,
                                   pad_rows=1)
        args[6] = jnp.arange(len(seqs) + 2, dtype=jnp.int32)  # the contract: cu == arange(S+1)
    else:
        args, contexts = make_case(rng, seqs, hq, hkv, d, page_size, dtype, pages_per_seq)
    q, k, v, pool, kv_lens, page_indices, cu, _ = args
    scale = d ** -0.5

    def run(*a):
        return ragged_paged_attention(*a, sm_scale=scale, sliding_window=window,
                                      soft_cap=soft_cap, backend=backend, **kwargs)

    out, new_pool = (jax.jit(run) if jit else run)(*args)
    out, new_pool = np.asarray(out, np.float32), np.asarray(new_pool, np.float32)
    if tol is None:
        tol = 1e-5 if dtype == jnp.float32 else 2e-2
    q32, k32, v32 = (np.asarray(a, np.float32) for a in (q, k, v))
    for s, (ctx, q_len) in enumerate(seqs):
        rows = slice(int(cu[s]), int(cu[s + 1]))
        new_kv = np.stack([k32[rows], v32[rows]], 2).reshape(q_len, -1, d)
        full = np.concatenate([contexts[s], new_kv]).reshape(ctx + q_len, hkv, 2, d)
        want = dense_oracle(q32[rows], full[:, :, 0], full[:, :, 1],
                            np.arange(ctx, ctx + q_len), scale, window, soft_cap)
        np.testing.assert_allclose(out[rows], want, rtol=tol, atol=tol)
        for i in range(q_len):  # fused write landed in the right page and offset
            p = ctx + i
            np.testing.assert_allclose(
                new_pool[int(page_indices[s, p // page_size]), p % page_size], new_kv[i],
                rtol=tol, atol=tol)
    assert np.all(out[int(cu[len(seqs)]):] == 0), "idle and padding rows must output zeros"
    assert np.isfinite(out).all()
