"""One ragged paged attention call compiled by libtpu for a chip that is not attached: the unit
of the kernel compile matrix (tests/test_tpu_compile.py, tools/tpu_compile_matrix.py)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxgen.planning.targets import compiling_for
from pallas_kernels import ragged_paged_attention


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    """Shapes and options of one call: `tokens` query rows over `seqs` sequence rows, each with
    `pages_per_seq` page-table entries into a pool of `num_pages` pages."""
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "bfloat16" | "float32": queries, K/V and pool
    decode: bool
    window: int | None
    soft_cap: float | None
    page_size: int
    tokens: int
    seqs: int
    pages_per_seq: int
    num_pages: int = 512
    block_sizes: object = None  # TpuBlockSizes or None for the defaults

    @property
    def name(self) -> str:
        blocks = "" if self.block_sizes is None else (
            f"-b{self.block_sizes.num_kv_pages_per_block}x{self.block_sizes.num_queries_per_block}")
        return (f"{self.num_q_heads}/{self.num_kv_heads}/{self.head_dim}-{self.dtype}-"
                f"{'decode' if self.decode else 'mixed'}-w{self.window}-cap{self.soft_cap}-"
                f"p{self.page_size}{blocks}")


def compile_attention(device, case: AttentionCase):
    """The compiled call on `device`'s chip (the pool donated, as the engine does)."""
    shd = jax.sharding.SingleDeviceSharding(device)
    dtype = jnp.dtype(case.dtype)

    def sds(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, sharding=shd)

    t, hkv, d = case.tokens, case.num_kv_heads, case.head_dim
    args = (sds((t, case.num_q_heads, d), dtype), sds((t, hkv, d), dtype),
            sds((t, hkv, d), dtype), sds((case.num_pages, case.page_size, 2 * hkv, d), dtype),
            sds((case.seqs,), jnp.int32), sds((case.seqs, case.pages_per_seq), jnp.int32),
            sds((case.seqs + 1,), jnp.int32), sds((1,), jnp.int32))
    call = functools.partial(
        ragged_paged_attention, sm_scale=d ** -0.5, sliding_window=case.window,
        soft_cap=case.soft_cap, backend="tpu", decode_only=case.decode,
        block_sizes=case.block_sizes)
    with compiling_for(device):
        return jax.jit(call, donate_argnums=3).lower(*args).compile()


# The grid: heads (Hq/Hkv/D) x dtype x decode/mixed x window x soft-cap x page size, at
# serving shapes: 16 decode rows or a 128-token mixed step, 16 sequences of 64 pages.
GRID_HEADS = ((32, 8, 128), (4, 1, 256), (8, 8, 64))
GRID_LEVELS = ((None, 512), (None, 30.0), (16, 32))  # window, soft-cap, page size
# Two orthogonal arrays over the three two-level factors: each column meets each level twice,
# and the second array is the first's complement.
_ARRAYS = (((0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0)),
           ((1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1)))


def _case(heads, dtype, decode, window, cap, page) -> AttentionCase:
    hq, hkv, d = heads
    return AttentionCase(hq, hkv, d, dtype, decode, window, cap, page,
                         tokens=16 if decode else 128, seqs=16, pages_per_seq=64)


def full_grid() -> list[AttentionCase]:
    """All 96 combinations."""
    return [_case(h, dt, dec, w, c, p) for h in GRID_HEADS for dt in ("bfloat16", "float32")
            for dec in (True, False) for w in GRID_LEVELS[0] for c in GRID_LEVELS[1]
            for p in GRID_LEVELS[2]]


def covering_grid() -> list[AttentionCase]:
    """12 of the 96: every (heads, dtype, mode) once, its window / soft-cap / page levels from
    an orthogonal array, so every level of those three meets every heads config, dtype and
    mode (the third heads config takes the first array in reverse order)."""
    cases = []
    for h, heads in enumerate(GRID_HEADS):
        rows = _ARRAYS[h] if h < 2 else _ARRAYS[0][::-1]
        modes = [(dt, dec) for dt in ("bfloat16", "float32") for dec in (True, False)]
        for (dtype, decode), levels in zip(modes, rows):
            window, cap, page = (GRID_LEVELS[i][j] for i, j in enumerate(levels))
            cases.append(_case(heads, dtype, decode, window, cap, page))
    return cases
