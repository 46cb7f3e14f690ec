"""TPU ragged paged attention kernels (decode and mixed) against the reference, run by the TPU
interpreter on CPU with race detection, out-of-bounds reads raising and NaN-filled fresh memory.

Axes are combined rather than crossed: each case below covers several (GQA ratio 1 / 4 / 8 /
MQA, head dim 64 / 128 / 256, page 16 / 32, window, soft-cap, bf16, block sizes). Every case
checks the output against the reference, the whole pool bit for bit against the reference's
pool (written rows equal, every other row, NaN poison included, untouched), zeros on padding
and idle rows, and that the interpreter saw no race. The kernel gets a page table whose entries
it must not read (idle and padding sequences, pages after a sequence's last token, pages wholly
before its window) point past the pool, so fetching one raises: every case also checks what the
kernels skip.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding, PartitionSpec as P

from pallas_kernels import ragged_paged_attention
from pallas_kernels.ragged_paged_attention.tpu import TpuBlockSizes
from tests.attention_cases import check, make_case

INTERPRET = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise",
                                  uninitialized_memory="nan")
F32, BF16 = jnp.float32, jnp.bfloat16
TOL = {F32: 1e-5, BF16: 1e-2}


@pytest.fixture(autouse=True)
def tpu_interpreter(capsys):
    with pltpu.force_tpu_interpret_mode(INTERPRET):
        try:
            yield
        finally:
            pltpu.reset_tpu_interpret_mode_state()
    assert "RACE DETECTED" not in capsys.readouterr().out


def _poison_unread_pages(args, window):
    """`args` with every page-table entry the kernels must not read pointing past the pool."""
    kv_lens, cu = np.asarray(args[4]), np.asarray(args[6])
    pages, page_size = np.asarray(args[5]), args[3].shape[1]
    column = np.arange(pages.shape[1])
    read = np.zeros(pages.shape, bool)
    for s in range(int(np.asarray(args[7]).reshape(()))):
        if kv_lens[s] > 0:
            first_pos = kv_lens[s] - (cu[s + 1] - cu[s])
            first_key = 0 if window is None else max(first_pos - window + 1, 0)
            read[s] = (column >= first_key // page_size) & (column <= (kv_lens[s] - 1) // page_size)
    kernel_args = list(args)
    kernel_args[5] = jnp.asarray(np.where(read, pages, args[3].shape[0] + 1000), jnp.int32)
    return kernel_args


def _decode_case(rng, contexts, hq, hkv, d, page_size, dtype):
    """A decode step (T == S, row s is sequence s) over `contexts`, plus one idle slot row."""
    args, _ = make_case(rng, [(c, 1) for c in contexts], hq, hkv, d, page_size, dtype,
                        pad_rows=1)
    args[6] = jnp.arange(len(contexts) + 2, dtype=jnp.int32)  # the idle slot has a row too
    return args


def _run(args, *, dtype, window=None, soft_cap=None, block_sizes=None, decode_only=False):
    """Kernel (on a page table poisoned where it must not read) vs reference on `args`."""
    kw = dict(sm_scale=args[0].shape[-1] ** -0.5, sliding_window=window, soft_cap=soft_cap)
    kernel = functools.partial(ragged_paged_attention, backend="tpu", decode_only=decode_only,
                               block_sizes=block_sizes, **kw)
    out, pool = jax.jit(kernel)(*_poison_unread_pages(args, window))
    out, pool = np.asarray(out, np.float32), np.asarray(pool, np.float32)  # block now
    reference = functools.partial(ragged_paged_attention, backend="reference", **kw)
    want, want_pool = jax.jit(reference)(*args)
    np.testing.assert_allclose(out, np.asarray(want, np.float32), rtol=TOL[dtype],
                               atol=TOL[dtype])
    np.testing.assert_array_equal(pool, np.asarray(want_pool, np.float32))
    cu, num_seqs = np.asarray(args[6]), int(np.asarray(args[7]).reshape(()))
    assert np.all(out[cu[num_seqs]:] == 0), "padding rows must output zeros"
    assert np.isfinite(out).all()
    return out


MIXED = {  # seqs [(context before, q_len)], hq, hkv, d, page, window, soft_cap, dtype, blocks
    "gqa1-d64-p16-multi-qblock": ([(37, 1), (0, 21), (16, 16), (0, 1), (5, 1), (31, 9)],
                                  4, 4, 64, 16, None, None, F32, TpuBlockSizes(2, 8)),
    "gqa4-d128-p32-window-cap": ([(70, 1), (0, 40), (50, 13), (3, 1)],
                                 8, 2, 128, 32, 20, 30.0, F32, TpuBlockSizes(1, 16)),
    "gqa8-d64-p16-cap-defaults": ([(37, 1), (0, 21), (16, 16), (31, 9)],
                                  16, 2, 64, 16, None, 20.0, F32, None),
    "mqa-d256-p16-window-bf16": ([(40, 1), (0, 18), (17, 3), (60, 5)],
                                 4, 1, 256, 16, 24, None, BF16, TpuBlockSizes(2, 8)),
    "mqa-d128-p32-small-window": ([(5, 1), (0, 33), (64, 1), (31, 2)],
                                  8, 1, 128, 32, 7, 50.0, F32, TpuBlockSizes(3, 4)),
    "gqa3-d64-p16-smollm2-heads": ([(50, 1), (0, 12), (9, 7)],
                                   9, 3, 64, 16, None, None, BF16, TpuBlockSizes(2, 8)),
    "tiny-contexts-page-edges": ([(0, 1), (15, 1), (16, 1), (31, 1), (0, 2), (14, 2)],
                                 8, 2, 64, 16, None, None, F32, TpuBlockSizes(1, 1)),
}

DECODE = {  # contexts before the new token, hq, hkv, d, page, window, soft_cap, dtype, blocks
    "gqa1-d64-p16": ([37, 0, 15, 16, 5, 80], 2, 2, 64, 16, None, None, F32,
                     TpuBlockSizes(2, 8)),
    "gqa4-d128-p32-window": ([70, 0, 31, 32, 100], 8, 2, 128, 32, 40, None, F32,
                             TpuBlockSizes(1, 8)),
    "gqa8-d128-p16-cap-bf16": ([3, 47, 64, 0], 16, 2, 128, 16, None, 30.0, BF16, None),
    "mqa-d256-p16-window-cap": ([40, 1, 90, 17], 4, 1, 256, 16, 24, 50.0, F32,
                                TpuBlockSizes(3, 8)),
}


@pytest.mark.parametrize("case", MIXED.values(), ids=MIXED.keys())
def test_mixed_matches_reference(case):
    seqs, hq, hkv, d, page_size, window, soft_cap, dtype, blocks = case
    args, _ = make_case(np.random.default_rng(d + hq), seqs, hq, hkv, d, page_size, dtype)
    _run(args, dtype=dtype, window=window, soft_cap=soft_cap, block_sizes=blocks)


@pytest.mark.parametrize("case", DECODE.values(), ids=DECODE.keys())
def test_decode_only_matches_reference(case):
    contexts, hq, hkv, d, page_size, window, soft_cap, dtype, blocks = case
    args = _decode_case(np.random.default_rng(d + hq), contexts, hq, hkv, d, page_size, dtype)
    _run(args, dtype=dtype, window=window, soft_cap=soft_cap, block_sizes=blocks,
         decode_only=True)


@pytest.mark.parametrize("decode_only", [False, True])
def test_against_float64_oracle(decode_only):
    """The shared float64 oracle, independent of the reference."""
    seqs = [(37, 1), (0, 1), (20, 1)] if decode_only else [(37, 1), (0, 21), (20, 6)]
    check(seqs, 8, 2, 64, 16, window=30, soft_cap=25.0, seed=3, backend="tpu",
          decode_only=decode_only, block_sizes=TpuBlockSizes(2, 4))


@pytest.mark.parametrize("decode_only", [False, True])
def test_idle_slot_with_query_rows_reads_and_writes_nothing(decode_only):
    """A kv_len 0 slot below num_seqs, with a query row and a page table pointing outside the
    pool: no read, no write (either would raise), output 0."""
    rng = np.random.default_rng(11)
    if decode_only:
        args = _decode_case(rng, [20, 9, 33], 4, 2, 64, 16, F32)
    else:
        args, _ = make_case(rng, [(20, 1), (9, 1), (0, 5), (33, 2)], 4, 2, 64, 16, F32)
    args[4] = args[4].at[1].set(0)
    out = _run(args, dtype=F32, block_sizes=TpuBlockSizes(2, 4), decode_only=decode_only)
    assert np.all(out[1] == 0)


def test_block_sizes_and_promises_are_validated():
    with pytest.raises(ValueError, match="num_kv_pages_per_block=0"):
        TpuBlockSizes(num_kv_pages_per_block=0)
    with pytest.raises(ValueError, match="vmem_limit_bytes=-1"):
        TpuBlockSizes(vmem_limit_bytes=-1)
    args, _ = make_case(np.random.default_rng(0), [(3, 2)], 4, 2, 64, 16, F32)
    with pytest.raises(ValueError, match="decode_only=True with 5 query rows"):
        ragged_paged_attention(*args, sm_scale=0.1, backend="tpu", decode_only=True)


@pytest.mark.parametrize("mesh_shape, hq, hkv, decode_only", [
    ((1, 4), 16, 4, False),  # kv heads split over `model`, one head per device
    ((2, 2), 8, 2, True),  # split over `model`, replicated over `data`
    ((1, 4), 4, 1, False),  # MQA: replicated, every device runs the whole call
])
def test_on_a_mesh_each_device_runs_its_kv_heads(mesh_shape, hq, hkv, decode_only):
    """With a context mesh the kernel runs per device (XLA cannot partition a Mosaic call):
    the outputs and the whole pool equal one device's reference, and the pool keeps the heads
    split the caller gave it."""
    mesh = jax.make_mesh(mesh_shape, ("data", "model"), devices=jax.devices()[:4])
    rng = np.random.default_rng(7)
    if decode_only:
        args = _decode_case(rng, [20, 9, 33], hq, hkv, 64, 16, F32)
    else:
        args, _ = make_case(rng, [(20, 1), (0, 9), (33, 2)], hq, hkv, 64, 16, F32)
    split = "model" if hkv % mesh_shape[1] == 0 else None
    specs = [P(None, split, None)] * 3 + [P(None, None, split, None)] + [P()] * 4
    placed = [jax.device_put(a, NamedSharding(mesh, spec)) for a, spec in zip(args, specs)]
    kernel = functools.partial(ragged_paged_attention, sm_scale=0.125, backend="tpu",
                               decode_only=decode_only, block_sizes=TpuBlockSizes(2, 8))
    with jax.set_mesh(mesh):
        out, pool = jax.jit(kernel)(*placed)
    assert pool.sharding.spec == specs[3]
    want, want_pool = jax.jit(functools.partial(ragged_paged_attention, sm_scale=0.125,
                                                backend="reference"))(*args)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(pool), np.asarray(want_pool))
