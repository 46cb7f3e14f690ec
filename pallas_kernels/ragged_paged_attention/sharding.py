"""How a Pallas kernel call runs on a mesh: per device under `shard_map`, split by kv heads.

XLA cannot partition a Pallas custom call (a Mosaic kernel with sharded operands fails to lower:
"Mosaic kernels cannot be automatically partitioned"), so on a mesh the call must be explicitly
per device. Each kv head's K/V rows (`2h`, `2h + 1` of the pool) and its `G` query heads
(`h * G ... h * G + G - 1`) are independent of every other head's, so when `head_axis` divides
the kv heads, each device runs the kernel on its own heads: its slice of `q`, `k`, `v` and of the
pool, with the whole page table. Otherwise (MQA on a tensor-parallel mesh, or kv heads that the
axis does not divide) every operand is replicated and each device runs the whole call. Tokens,
pages, head dim and the scalar metadata are never split: a ragged batch cannot be cut between its
rows. Other mesh axes (`data`) replicate the call.

The mesh is the caller's context mesh (`jax.sharding.use_mesh` / `jax.set_mesh` while tracing):
kernels receive no mesh argument, and with no context mesh (or one device) nothing changes.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P


def head_split(num_kv_heads: int, head_axis: str | None, mesh) -> str | None:
    """`head_axis` when it exists on `mesh`, has more than one device and divides the kv heads;
    else None (replicated)."""
    if head_axis is None or head_axis not in mesh.axis_names:
        return None
    size = mesh.shape[head_axis]
    return head_axis if size > 1 and num_kv_heads % size == 0 else None


def per_device(call, num_kv_heads: int, head_axis: str | None):
    """`call(q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs) -> (out, kv_pages)`
    run per device on the context mesh, or `call` itself when there is none."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return call
    axis = head_split(num_kv_heads, head_axis, mesh)
    heads, pool, whole = P(None, axis, None), P(None, None, axis, None), P()
    return jax.shard_map(call, mesh=mesh, in_specs=(heads, heads, heads, pool) + (whole,) * 4,
                         out_specs=(heads, pool), check_vma=False)
