"""`layers.project`: a one-row projection run as two rows (the GPU fast path) equals the plain
einsum, alone and through a whole batch-1 decode step of each model family; the embed-major
embedding table (the CPU layout) gives the same logits as the checkpoint layout; the layers'
shared trace gives the same logits as every layer written out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.models import Model, layers
from jaxgen.models.gemma3 import Gemma3Block
from jaxgen.models.llama import LlamaBlock
from tests.helpers import TINY_GEMMA3, TINY_LLAMA, packed_metadata

SPECS = [("te,ehcd->thcd", (1, 24), (24, 2, 5, 8)),  # fused Q/K/V
         ("tk,ke->te", (1, 40), (40, 24)),  # output projection
         ("te,ecf->tcf", (1, 24), (24, 2, 48)),  # fused gate/up
         ("tf,fe->te", (1, 48), (48, 24))]  # down


@pytest.mark.parametrize("spec,x_shape,w_shape", SPECS, ids=["qkv", "o", "gate_up", "down"])
def test_one_row_as_two_equals_the_plain_einsum(spec, x_shape, w_shape):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, x_shape, jnp.float32)
    w = jax.random.normal(kw, w_shape, jnp.float32)
    plain = layers.project(spec, x, w, one_row="off")
    padded = layers.project(spec, x, w, one_row="always")
    assert padded.shape == plain.shape == jnp.einsum(spec, x, w).shape
    np.testing.assert_allclose(np.asarray(padded), np.asarray(plain), rtol=1e-6, atol=1e-6)


def test_the_two_row_path_is_taken_only_for_one_row():
    x1, x2, w = jnp.ones((1, 8)), jnp.ones((3, 8)), jnp.ones((8, 4))
    jaxpr = lambda x, mode: str(jax.make_jaxpr(
        lambda x: layers.project("te,ef->tf", x, w, one_row=mode))(x))
    assert "pad" in jaxpr(x1, "always")
    assert "pad" not in jaxpr(x2, "always")  # already a matrix
    assert "pad" not in jaxpr(x1, "off")
    assert "pad" not in jaxpr(x1, "gpu")  # these tests run on CPU: no strength reduction there
    with pytest.raises(ValueError, match="one_row='pad2'"):
        layers.project("te,ef->tf", x1, w, one_row="pad2")


@pytest.mark.parametrize("rows", [2, 5])
def test_vocabulary_blocked_logits_equal_the_plain_product(rows):
    vocab = 3 * layers.CPU_VOCAB_BLOCK
    kx, kw = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (rows, 32), jnp.float32)
    w = jax.random.normal(kw, (vocab, 32), jnp.float32)
    blocked = layers.output_logits(x, w, 0, blocked=True)
    plain = layers.output_logits(x, w, 0, blocked=False)
    assert blocked.shape == plain.shape == (rows, vocab)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(plain), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(layers.output_logits(x, w.T, 1)), np.asarray(plain),
                               rtol=1e-5, atol=1e-5)


def test_the_blocked_output_projection_is_taken_only_where_it_helps():
    vocab = 2 * layers.CPU_VOCAB_BLOCK
    jaxpr = lambda x, w, axis, blocked=True: str(jax.make_jaxpr(
        lambda x: layers.output_logits(x, w, axis, blocked))(x))
    w = jnp.ones((vocab, 8))
    assert "reshape" in jaxpr(jnp.ones((4, 8)), w, 0)  # several rows: blocked
    assert "reshape" not in jaxpr(jnp.ones((4, 8)), w, 0, blocked=False)  # not the CPU path
    assert "reshape" not in jaxpr(jnp.ones((1, 8)), w, 0)  # one row: a vector product already
    assert "reshape" not in jaxpr(jnp.ones((4, 8)), w.T, 1)  # [embed, vocab] blocks are strided
    assert "reshape" not in jaxpr(jnp.ones((4, 8)), jnp.ones((vocab + 8, 8)), 0)  # not whole blocks


def test_a_model_built_for_an_accelerator_keeps_the_plain_output_projection():
    """`jaxgen plan` compiles TPU programs on this CPU host: the CPU-only blocking must not
    reach them (nor GPU kernels' models); a model for this host's CPU gets the default. Read
    from the model's whole forward pass over several rows: its output projection is a product
    against `[blocks, CPU_VOCAB_BLOCK, hidden]` exactly when the model was built for the CPU."""
    from jaxgen.models.base import AttentionMetadata

    assert layers.blocked_logits("auto") and layers.blocked_logits("xla")  # this CPU host
    assert not layers.blocked_logits("tpu") and not layers.blocked_logits("gpu")
    rows, seqs, pages_per_seq = 4, 2, 4
    md = AttentionMetadata(jnp.zeros(seqs, jnp.int32), jnp.zeros((seqs, pages_per_seq), jnp.int32),
                           jnp.zeros(seqs + 1, jnp.int32), jnp.ones(1, jnp.int32))
    tokens = jnp.zeros(rows, jnp.int32)
    for cfg in (TINY_GEMMA3, TINY_LLAMA.replace(tie_embeddings=True)):  # both tie, as shipped
        cfg = cfg.replace(vocab_size=2 * layers.CPU_VOCAB_BLOCK)
        blocks = f"[2,{layers.CPU_VOCAB_BLOCK},{cfg.hidden_size}]"
        for backend, blocked in (("auto", True), ("tpu", False), ("gpu", False)):
            model = Model(cfg, attn_backend=backend)
            pages = [jax.ShapeDtypeStruct(model.kv_page_shape(16, 16), jnp.float32)] * cfg.num_layers
            jaxpr = str(jax.make_jaxpr(model.forward)(model.abstract_params, tokens, tokens,
                                                      pages, md))
            assert (blocks in jaxpr) == blocked, (cfg.architecture, backend)


@pytest.mark.parametrize("cfg", [TINY_GEMMA3, TINY_LLAMA], ids=["gemma3", "llama"])
def test_batch_one_decode_step_is_the_same_through_two_rows(cfg, monkeypatch):
    model = Model(cfg)
    params = model.init_random(seed=1)
    rng = np.random.default_rng(0)
    page_indices = np.array([[1, 2]])
    md_prefill = packed_metadata([(9, 9)], page_indices)
    md_decode = packed_metadata([(10, 1)], page_indices)
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, 9), jnp.int32)

    def decode_logits(mode):
        monkeypatch.setattr(layers, "ONE_ROW", mode)
        fwd = jax.jit(model.forward)  # traced afresh per mode
        pages = model.init_kv_pages(4, 16)
        _, pages = fwd(params, prompt, jnp.arange(9, dtype=jnp.int32), pages, md_prefill)
        logits, _ = fwd(params, jnp.asarray([5], jnp.int32), jnp.asarray([9], jnp.int32), pages,
                        md_decode)
        return np.asarray(logits)

    np.testing.assert_allclose(decode_logits("always"), decode_logits("off"), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("cfg", [TINY_GEMMA3, TINY_LLAMA], ids=["gemma3", "llama"])
def test_embed_major_table_gives_the_same_logits(cfg):
    """The CPU layout (`[embed, vocab]` table: column lookups, `x @ table` logits) against the
    checkpoint layout on the same weights, prefill and decode; canonical round trip exact."""
    vocab_major = Model(cfg, embed_layout="vocab_major")
    embed_major = Model(cfg, embed_layout="embed_major")
    assert vocab_major.abstract_params["embed"].shape == (cfg.vocab_size, cfg.hidden_size)
    assert embed_major.abstract_params["embed"].shape == (cfg.hidden_size, cfg.vocab_size)
    params = vocab_major.init_random(seed=4)
    moved = embed_major.from_canonical(params)
    np.testing.assert_array_equal(np.asarray(embed_major.canonical_params(moved)["embed"]),
                                  np.asarray(params["embed"]))
    assert vocab_major.canonical_params(params) is params
    rng = np.random.default_rng(2)
    page_indices = np.array([[1, 2]])
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, 9), jnp.int32)

    def logits(model, p):
        fwd = jax.jit(model.forward)
        pages = model.init_kv_pages(4, 16)
        first, pages = fwd(p, prompt, jnp.arange(9, dtype=jnp.int32), pages,
                           packed_metadata([(9, 9)], page_indices))
        step, _ = fwd(p, jnp.asarray([7], jnp.int32), jnp.asarray([9], jnp.int32), pages,
                      packed_metadata([(10, 1)], page_indices))
        return np.asarray(first), np.asarray(step)

    for want, got in zip(logits(vocab_major, params), logits(embed_major, moved)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_embed_layout_auto_is_checkpoint_order():
    assert Model(TINY_GEMMA3).embed_layout == Model(TINY_LLAMA).embed_layout == "vocab_major"
    assert Model(TINY_LLAMA, embed_layout="embed_major").embed_major
    with pytest.raises(ValueError, match="embed_layout='rows'"):
        Model(TINY_LLAMA, embed_layout="rows")


def test_embed_major_model_restores_and_saves_checkpoint_order(tmp_path):
    from jaxgen.checkpoints import orbax_format

    plain, moved = Model(TINY_LLAMA), Model(TINY_LLAMA, embed_layout="embed_major")
    params = plain.init_random(seed=6)
    orbax_format.save(str(tmp_path / "c"), TINY_LLAMA, params)
    restored = orbax_format.restore(str(tmp_path / "c"), moved)
    np.testing.assert_array_equal(np.asarray(restored["embed"]), np.asarray(params["embed"]).T)
    with pytest.raises(ValueError, match=r"params\['embed'\] has shape \(64, 256\)"):
        orbax_format.save(str(tmp_path / "d"), TINY_LLAMA, restored)


@pytest.mark.parametrize("cfg,block_type,kinds", [(TINY_GEMMA3, Gemma3Block, 2),
                                                  (TINY_LLAMA, LlamaBlock, 1)], ids=["gemma3", "llama"])
def test_shared_block_trace_equals_the_layers_written_out(cfg, block_type, kinds, monkeypatch):
    """`_apply_block` (the default) against every layer inline: the same logits and pages, bit
    for bit, prefill and decode; and the block body is traced once per block structure (Gemma
    3: local and global layers; Llama: one) instead of once per layer."""
    traced = []
    call = block_type.__call__
    monkeypatch.setattr(block_type, "__call__",
                        lambda self, *a: traced.append(1) or call(self, *a))
    rng = np.random.default_rng(3)
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, 13), jnp.int32)  # 13: shapes no other test uses
    page_indices = np.array([[1, 2]])
    params = Model(cfg).init_random(seed=5)

    def run(shared):
        # The reference attention: the subject is the blocks' tracing, not the kernels'.
        model = Model(cfg, attn_backend="reference", shared_block_trace=shared)
        fwd = jax.jit(model.forward)
        traced.clear()
        first, pages = fwd(params, prompt, jnp.arange(13, dtype=jnp.int32),
                           model.init_kv_pages(4, 16), packed_metadata([(13, 13)], page_indices))
        prefill_traces = len(traced)
        step, pages = fwd(params, jnp.asarray([7], jnp.int32), jnp.asarray([13], jnp.int32), pages,
                          packed_metadata([(14, 1)], page_indices))
        return prefill_traces, [np.asarray(a) for a in (first, step, *pages)]

    inline_traces, inline = run(False)
    shared_traces, shared = run(True)
    assert inline_traces == cfg.num_layers
    assert shared_traces == kinds < cfg.num_layers
    for want, got in zip(inline, shared):
        np.testing.assert_array_equal(got, want)
