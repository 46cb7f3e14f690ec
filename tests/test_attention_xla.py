"""The blocked plain-XLA backend (the CPU path) against the float64 oracle and the reference:
mixed and decode steps, GQA/MQA, head dims, page sizes, sliding window, soft-cap, block sizes,
bf16 pools; NaN outside every sequence's written tokens (`make_case`) must never leak in."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ragged_paged_attention, resolve_backend
from pallas_kernels.ragged_paged_attention.xla import XlaBlockSizes
from tests.attention_cases import (DECODE, HEADS, MIXED, WINDOW_SOFTCAP, bf16_seqs, block_seqs,
                                   check, make_case, window_seqs)



def test_auto_picks_it_on_cpu():
    assert resolve_backend("auto", "cpu") == "xla"
    assert resolve_backend("auto", "gpu") == "gpu" and resolve_backend("auto", "tpu") == "tpu"


@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize("decode_only", [False, True])
def test_heads_and_dims(hq, hkv, d, decode_only):
    check(DECODE if decode_only else MIXED, hq, hkv, d, page_size=16, seed=d + hq,
          backend="xla", decode_only=decode_only)


@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("window,soft_cap", WINDOW_SOFTCAP)
@pytest.mark.parametrize("decode_only", [False, True])
def test_window_and_softcap(page_size, window, soft_cap, decode_only):
    check(window_seqs(decode_only), 8, 2, 64, page_size, window=window, soft_cap=soft_cap,
          seed=page_size, backend="xla", decode_only=decode_only)


@pytest.mark.parametrize("blocks", [XlaBlockSizes(1, 1), XlaBlockSizes(2, 7), XlaBlockSizes(16, 64)])
@pytest.mark.parametrize("decode_only", [False, True])
def test_block_sizes(blocks, decode_only):
    seqs, window = block_seqs(decode_only)
    check(seqs, 8, 2, 64, 16, window=window, seed=3, backend="xla",
          decode_only=decode_only, block_sizes=blocks)


@pytest.mark.parametrize("decode_only", [False, True])
def test_bf16_pool(decode_only):
    check(bf16_seqs(decode_only), 8, 1, 128, 16, window=24, dtype=jnp.bfloat16, backend="xla",
          decode_only=decode_only)


# A speculative verify step's shape: each sequence at most 1 + K rows (K = 4; fewer when it
# drafted fewer), contexts ending mid-page and on page boundaries.
VERIFY = [(37, 5), (0, 5), (16, 3), (70, 1), (33, 5)]


@pytest.mark.parametrize("window,soft_cap", [(None, None), (40, 30.0)])
@pytest.mark.parametrize("blocks", [None, XlaBlockSizes(2, 4)])  # 4 < max_q_len: plain blocks
def test_max_q_len_one_block_per_sequence(window, soft_cap, blocks):
    """`max_q_len` (one work block per sequence, as long as its longest) against the oracle,
    and against the same call without it (blocks of `block_q`): the same pool, the same
    outputs to float32 rounding."""
    check(VERIFY, 8, 2, 64, 16, window=window, soft_cap=soft_cap, seed=11, backend="xla",
          max_q_len=5, block_sizes=blocks)
    args, _ = make_case(np.random.default_rng(12), VERIFY, 8, 2, 64, 16, jnp.float32)
    calls = {m: jax.jit(lambda *a, m=m: ragged_paged_attention(
        *a, sm_scale=0.125, sliding_window=window, soft_cap=soft_cap, backend="xla",
        max_q_len=m, block_sizes=blocks)) for m in (None, 5)}
    outs = {m: call(*args) for m, call in calls.items()}
    flops = {m: call.lower(*args).compile().cost_analysis()["flops"] for m, call in calls.items()}
    if blocks is None:  # 5 work blocks of 5 rows against 2 + 5 blocks of 16
        assert flops[5] < 0.5 * flops[None], flops
    else:
        assert flops[5] == flops[None], flops
    np.testing.assert_array_equal(np.asarray(outs[5][1]), np.asarray(outs[None][1]))
    np.testing.assert_allclose(np.asarray(outs[5][0]), np.asarray(outs[None][0]),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_max_q_len_must_be_a_positive_integer(bad):
    args, _ = make_case(np.random.default_rng(0), VERIFY, 8, 2, 64, 16, jnp.float32)
    with pytest.raises(ValueError, match=rf"max_q_len={bad!r}: must be an integer >= 1"):
        ragged_paged_attention(*args, sm_scale=0.125, backend="xla", max_q_len=bad)


def test_no_live_rows_and_a_long_page_table():
    """Only idle rows: zeros, pool unchanged. A table far longer than the context (what a large
    max_model_len gives) changes nothing: pages past the context are never read."""
    rng = np.random.default_rng(1)
    args, _ = make_case(rng, [(20, 3)], 4, 2, 64, 16, jnp.float32, pages_per_seq=40)
    q, k, v, pool, kv_lens, table, cu, _ = args
    out, new_pool = ragged_paged_attention(q, k, v, pool, kv_lens * 0, table, cu,
                                           jnp.array([1], jnp.int32), sm_scale=0.1, backend="xla")
    assert np.all(np.asarray(out) == 0)
    np.testing.assert_array_equal(np.asarray(new_pool), np.asarray(pool))
    check([(20, 3), (5, 1)], 4, 2, 64, 16, backend="xla", pages_per_seq=40)


def test_equals_reference_bitwise_pool_and_close_outputs():
    rng = np.random.default_rng(5)
    args, _ = make_case(rng, MIXED, 8, 2, 64, 16, jnp.float32)
    outs = {b: jax.jit(lambda *a, b=b: ragged_paged_attention(*a, sm_scale=0.125, backend=b))(*args)
            for b in ("reference", "xla")}
    np.testing.assert_array_equal(np.asarray(outs["xla"][1]), np.asarray(outs["reference"][1]))
    np.testing.assert_allclose(np.asarray(outs["xla"][0]), np.asarray(outs["reference"][0]),
                               rtol=1e-5, atol=1e-5)


def test_engine_greedy_identical_to_reference():
    """End to end: continuous batching (chunked prefill, decode, sliding window, soft-cap)
    gives the same greedy tokens with the blocked backend as with the reference."""
    from jaxgen.models import Model
    from jaxgen.sampling_params import SamplingParams
    from tests.helpers import TINY_GEMMA3, ByteTokenizer, engine_for

    prompts = [list(b"The quick brown fox jumps over the lazy dog, twice over."), list(b"Hi"),
               list(b"0123456789" * 4)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = {}
    for backend in ("reference", "xla"):
        model = Model(TINY_GEMMA3, attn_backend=backend)
        engine = engine_for(model, model.init_random(seed=3), ByteTokenizer(), num_slots=2)
        outs[backend] = [c.token_ids for c in engine.generate(prompts, params)]
    assert outs["xla"] == outs["reference"]
