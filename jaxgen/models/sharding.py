"""Mesh construction and partition rules: logical parameter axes -> mesh axes.

Mesh axes are `data` (batch / slots) and `model` (heads, MLP hidden, vocab). A dimension whose
size the mesh axis does not divide is replicated instead (e.g. Gemma 3 270M's single KV head on
a `model` axis of 8), as serving stacks do for KV heads smaller than the tensor-parallel size.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")

# Logical axis -> mesh axis (None: replicated).
LOGICAL_RULES: dict[str, str | None] = {
    "vocab": "model",
    "embed": None,
    "q_heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "head_dim": None,
    "norm": None,
}


def parse_mesh_shape(spec: str | tuple[int, int] | None, num_devices: int) -> tuple[int, int]:
    """`"2,4"` / `(2, 4)` -> (data, model); None -> all devices on `model`."""
    if spec is None:
        return (1, num_devices)
    if isinstance(spec, str):
        try:
            shape = tuple(int(p) for p in spec.replace("x", ",").split(","))
        except ValueError:
            raise ValueError(f"mesh={spec!r}: must look like 'DATA,MODEL', e.g. '1,8'") from None
    else:
        shape = tuple(spec)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"mesh={spec!r}: must be two positive sizes (data, model)")
    if shape[0] * shape[1] != num_devices:
        raise ValueError(
            f"mesh={spec!r}: {shape[0]}x{shape[1]}={shape[0] * shape[1]} devices, "
            f"but {num_devices} are available")
    return shape


def make_mesh(spec: str | tuple[int, int] | None = None, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = parse_mesh_shape(spec, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def partition_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec for an array of `shape` with logical `axes` on `mesh`."""
    used: set[str] = set()
    spec = []
    for axis, size in zip(axes, shape):
        mesh_axis = LOGICAL_RULES.get(axis) if axis is not None else None
        if (mesh_axis is None or mesh_axis in used
                or size % mesh.shape[mesh_axis] != 0 or mesh.shape[mesh_axis] == 1):
            spec.append(None)
        else:
            spec.append(mesh_axis)
            used.add(mesh_axis)
    return PartitionSpec(*spec)


def tree_shardings(logical_axes, abstract, mesh: Mesh):
    """NamedShardings for a pytree of arrays given a matching pytree of logical-axis tuples."""
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
    return jax.tree.map(
        lambda axes, a: NamedSharding(mesh, partition_spec(axes, a.shape, mesh)),
        logical_axes, abstract, is_leaf=is_axes)


KV_PAGE_AXES = (None, None, "kv_heads", "head_dim")


def kv_pages_sharding(num_kv_heads: int, mesh: Mesh) -> NamedSharding:
    """Pages `[num_pages, page_size, 2*Hkv, D]` split over KV heads (K/V of a head stay together)."""
    # Sharding 2*Hkv over `model` keeps each head's K,V pair on one device iff Hkv divides.
    model = mesh.shape["model"]
    split = model > 1 and num_kv_heads % model == 0
    return NamedSharding(mesh, PartitionSpec(None, None, "model" if split else None, None))
