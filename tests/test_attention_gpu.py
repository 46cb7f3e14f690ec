"""The GPU (Pallas Triton) ragged paged attention kernels against the float64 oracle.

On CPU the kernels run in Pallas interpret mode; on a GPU the same tests run the compiled
kernels. Pools are NaN outside each sequence's written tokens (`make_case`), so any read past
`kv_lens` or into a foreign page shows up as a non-finite or wrong output.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ragged_paged_attention
from pallas_kernels.ragged_paged_attention.gpu import GpuBlockSizes
from tests.attention_cases import (DECODE, HEADS, MIXED, WINDOW_SOFTCAP, bf16_seqs, block_seqs,
                                   check, make_case, window_seqs)



@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_mixed(hq, hkv, d):
    check(MIXED, hq, hkv, d, page_size=16, seed=d + hq, backend="gpu")


@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_decode(hq, hkv, d):
    check(DECODE, hq, hkv, d, page_size=16, seed=d + hq, backend="gpu", decode_only=True)


@pytest.mark.parametrize("decode_only", [False, True])
def test_group_not_a_power_of_two(decode_only):
    """G = 3 (SmolLM2's 9/3 heads): the query rows are padded to the tensor-core M."""
    seqs = DECODE if decode_only else MIXED
    check(seqs, 9, 3, 64, 16, seed=9, backend="gpu", decode_only=decode_only)


@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("window,soft_cap", WINDOW_SOFTCAP)
@pytest.mark.parametrize("decode_only", [False, True])
def test_window_and_softcap(page_size, window, soft_cap, decode_only):
    check(window_seqs(decode_only), 8, 2, 64, page_size, window=window, soft_cap=soft_cap,
          seed=page_size, backend="gpu", decode_only=decode_only)


@pytest.mark.parametrize("blocks", [
    GpuBlockSizes(pages_per_block=1, num_splits=1, block_q=16),
    GpuBlockSizes(pages_per_block=2, num_splits=3, block_q=32),
    GpuBlockSizes(pages_per_block=4, num_splits=16, block_q=8),
    GpuBlockSizes(pages_per_block=1, num_splits=5, min_split_blocks=1),  # uneven, some empty
    GpuBlockSizes(pages_per_block=2, num_splits=16, min_split_blocks=3),
])
@pytest.mark.parametrize("decode_only", [False, True])
def test_block_sizes(blocks, decode_only):
    seqs, window = block_seqs(decode_only)
    check(seqs, 8, 2, 64, 16, window=window, seed=3, backend="gpu",
          decode_only=decode_only, block_sizes=blocks)


@pytest.mark.parametrize("decode_only", [False, True])
def test_bf16_pool(decode_only):
    check(bf16_seqs(decode_only), 8, 1, 128, 16, window=24, dtype=jnp.bfloat16, backend="gpu",
          decode_only=decode_only)


@pytest.mark.parametrize("decode_only", [False, True])
def test_equals_reference_bitwise_pool_and_close_outputs(decode_only):
    """The fused write (an XLA scatter in mixed steps, the decode kernel's own stores) writes
    the same pool as the reference, bit for bit: the new rows and nothing else."""
    rng = np.random.default_rng(5)
    args, _ = make_case(rng, DECODE if decode_only else MIXED, 8, 2, 64, 16, jnp.float32,
                        pad_rows=1 if decode_only else 3)
    if decode_only:
        args[6] = jnp.arange(len(DECODE) + 2, dtype=jnp.int32)
    outs = {b: ragged_paged_attention(*args, sm_scale=0.125, backend=b, decode_only=decode_only)
            for b in ("reference", "gpu")}
    np.testing.assert_array_equal(np.asarray(outs["gpu"][1]), np.asarray(outs["reference"][1]))
    np.testing.assert_allclose(np.asarray(outs["gpu"][0]), np.asarray(outs["reference"][0]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 40])
def test_decode_splits_follow_the_context_not_the_table(window):
    """Splits are cut from each sequence's visible blocks: a page table far wider than any
    context (the engine's max_model_len) and a window that starts mid-sequence still cover
    every visible key exactly once."""
    check([(300, 1), (5, 1), (97, 1)], 8, 2, 64, 16, window=window, seed=11, backend="gpu",
          decode_only=True, pages_per_seq=64,
          block_sizes=GpuBlockSizes(pages_per_block=1, num_splits=7, min_split_blocks=2))


@pytest.mark.parametrize("decode_only", [True, False], ids=["decode", "mixed"])
def test_last_block_past_the_table_end(decode_only):
    """A page table exactly as long as the context (10 pages) and a window whose first page (7)
    is not a multiple of pages_per_block (4): the last block's page-table entries run past the
    table's end; those keys are past the context, and the kernel must neither use them nor read
    outside the table (it clamps the entry, as no padded copy of the table is made). Pallas'
    interpreter clamps out-of-bounds reads by itself, so on CPU this checks the masking of
    those keys; the clamp in the compiled kernel is what the GPU run of this test covers."""
    seqs = [(159, 1), (150, 1), (70, 1)] if decode_only else [(150, 10), (159, 1), (40, 20)]
    check(seqs, 8, 2, 64, 16, window=40, seed=5, backend="gpu", decode_only=decode_only,
          pages_per_seq=10, block_sizes=GpuBlockSizes(pages_per_block=4, num_splits=3))


def test_engine_greedy_identical_across_backends():
    """End to end: continuous batching (chunked prefill, decode, sliding window, soft-cap)
    gives the same greedy tokens with the GPU kernels as with the reference."""
    from jaxgen.models import Model
    from jaxgen.sampling_params import SamplingParams
    from tests.helpers import TINY_GEMMA3, ByteTokenizer, engine_for

    config = TINY_GEMMA3  # GQA, sliding window 12 on every other layer, soft-cap
    prompts = [list(b"The quick brown fox jumps over the lazy dog, twice over."), list(b"Hi"),
               list(b"0123456789" * 4)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = {}
    for backend in ("reference", "gpu"):
        model = Model(config, attn_backend=backend)
        engine = engine_for(model, model.init_random(seed=3), ByteTokenizer(), num_slots=2)
        outs[backend] = [c.token_ids for c in engine.generate(prompts, params)]
    assert outs["gpu"] == outs["reference"]
