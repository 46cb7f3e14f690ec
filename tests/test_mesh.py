"""Sharded == single device: meshes (1,8), (2,4), (8,1) over 8 CPU devices give the same
logits, and an Orbax checkpoint restores straight into the requested shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxgen.checkpoints import orbax_format
from jaxgen.models import Model
from jaxgen.models.sharding import make_mesh, partition_spec
from tests.helpers import TINY_GEMMA3, TINY_LLAMA, packed_metadata

SEQS = [(13, 13), (22, 22), (5, 5), (8, 8)]  # 48 tokens: divisible by the data axis


def _step(model, params, pages, mesh=None):
    rng = np.random.default_rng(0)
    total = sum(q for _, q in SEQS)
    tokens = rng.integers(0, model.config.vocab_size, total).astype(np.int32)
    positions = np.concatenate([np.arange(q) for _, q in SEQS]).astype(np.int32)
    table = 1 + np.arange(len(SEQS) * 2).reshape(len(SEQS), 2)
    md = packed_metadata(SEQS, table)
    tokens, positions = jnp.asarray(tokens), jnp.asarray(positions)
    if mesh is not None:  # tokens split over `data`
        rows = NamedSharding(mesh, PartitionSpec("data"))
        tokens, positions = jax.device_put(tokens, rows), jax.device_put(positions, rows)
    logits, _ = jax.jit(model.forward)(params, tokens, positions, pages, md)
    return np.asarray(logits)


@pytest.mark.parametrize("cfg", [TINY_GEMMA3, TINY_LLAMA], ids=["gemma3", "llama"])
def test_meshes_match_single_device(cfg):
    assert len(jax.devices()) == 8
    model = Model(cfg)
    params = model.init_random(seed=1)
    want = _step(model, params, model.init_kv_pages(16, 16))
    for shape in [(1, 8), (2, 4), (8, 1)]:
        mesh = make_mesh(shape)
        sharded = jax.device_put(params, model.param_shardings(mesh))
        got = _step(model, sharded, model.init_kv_pages(16, 16, mesh=mesh), mesh)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                                   err_msg=f"mesh {shape}")


def test_partition_rules():
    mesh = make_mesh((2, 4))
    assert partition_spec(("embed", "q_heads", "head_dim"), (64, 8, 16), mesh) == \
        PartitionSpec(None, "model", None)
    # 1 KV head cannot be split 4 ways: replicated rather than failing.
    assert partition_spec(("embed", "kv_heads", "head_dim"), (64, 1, 16), mesh) == \
        PartitionSpec(None, None, None)
    assert partition_spec(("vocab", "embed"), (256, 64), mesh) == PartitionSpec("model", None)


def test_orbax_restores_into_requested_shardings(tmp_path):
    model = Model(TINY_LLAMA)
    params = model.init_random(seed=2)
    orbax_format.save(str(tmp_path / "ckpt"), TINY_LLAMA, model.canonical_params(params))
    mesh = make_mesh((2, 4))
    restored = orbax_format.restore(str(tmp_path / "ckpt"), model, mesh)
    want_shardings = model.param_shardings(mesh)
    flat_r, flat_s = orbax_format.flatten(restored), orbax_format.flatten(want_shardings)
    flat_p = orbax_format.flatten(params)
    for name, array in flat_r.items():
        assert array.sharding.is_equivalent_to(flat_s[name], array.ndim), name
        np.testing.assert_array_equal(np.asarray(array), np.asarray(flat_p[name]))
    # [embed, 2 KV heads, 4 + 2, head_dim]: 2 KV heads cannot split 4 ways, so replicated
    qkv = flat_r["layers.0.attn.qkv"]
    assert qkv.shape == (64, 2, 6, 16) and set(qkv.sharding.spec) <= {None}
    # [embed, 2, mlp 128] split 4 ways on the MLP hidden axis, gate and up rows together
    gate_up = flat_r["layers.0.mlp.gate_up"]
    assert gate_up.sharding.spec == PartitionSpec(None, None, "model")
    assert {s.data.shape for s in gate_up.addressable_shards} == {(64, 2, 32)}
