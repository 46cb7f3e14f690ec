"""Malformed checkpoints, fuzzed: truncations and byte flips over a GGUF's header and tensor
table, over a safetensors header, and an Orbax directory with a file missing or damaged. Every
case either loads a complete model (a flip may land on a value that is still valid: a GGUF has
no checksum) or raises one `CheckpointError` naming the file — never another exception (a
traceback from the CLI), a hang, a crash, or a model with tensors missing.

The checkpoints are tiny (a 2-layer Llama with a byte-level vocabulary), so a case loads in
tens of milliseconds; the cases are derandomized, the same in every run."""

from __future__ import annotations

import concurrent.futures
import os
import shutil

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxgen import checkpoints
from jaxgen.checkpoints import CheckpointError, orbax_format
from jaxgen.models import Model
from jaxgen.tokenizer.bpe import _byte_spelling
from tests.helpers import TINY_LLAMA

LOAD_TIMEOUT_S = 60  # a case that takes longer has hung
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def tiny_gguf(path) -> int:
    """A 2-layer Llama GGUF with a 258-token byte-level vocabulary; returns where its tensor
    data begins (everything before is header, metadata and tensor table)."""
    import gguf

    from jaxgen.gguf_reader import GGUFFile

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(_byte_spelling() + ["he", "<|endoftext|>"])
    w.add_token_types([1] * 257 + [3])
    w.add_token_merges(["h e"])
    w.add_eos_token_id(257)
    shapes = {"token_embd.weight": (258, 64), "output_norm.weight": (64,)}
    for i in range(2):
        shapes |= {f"blk.{i}.{name}.weight": shape for name, shape in [
            ("attn_norm", (64,)), ("ffn_norm", (64,)), ("attn_q", (64, 64)), ("attn_k", (32, 64)),
            ("attn_v", (32, 64)), ("attn_output", (64, 64)), ("ffn_gate", (128, 64)),
            ("ffn_up", (128, 64)), ("ffn_down", (64, 128))]}
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFFile(path).data_offset


def tiny_hf(directory) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(directory)


def load_or_error(path: str):
    """`checkpoints.load(path)` on a worker thread, bounded: the loaded model, or the error."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        future = pool.submit(checkpoints.load, path)
        try:
            return future.result(timeout=LOAD_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            pytest.fail(f"loading {path} hung for {LOAD_TIMEOUT_S}s")
        except CheckpointError as e:
            return e
    finally:
        pool.shutdown(wait=False)


def check(path: str, named: str) -> None:
    """One clear error naming the checkpoint, or a complete model."""
    result = load_or_error(path)
    if isinstance(result, CheckpointError):
        assert named in str(result) and "\n" not in str(result).strip(), str(result)
        return
    want = Model(result.config).abstract_params
    got = jax.tree.map(lambda a: (a.shape, a.dtype), result.params)
    assert got == jax.tree.map(lambda a: (a.shape, a.dtype), want)


class Original:
    """A checkpoint's bytes and where its header ends (a short repr for hypothesis' reports)."""

    def __init__(self, work, data: bytes, header: int):
        self.work, self.data, self.header = work, data, header

    def __repr__(self):
        return f"Original({len(self.data)} bytes, header {self.header})"


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz-gguf")
    path = work / "tiny.gguf"
    header = tiny_gguf(path)
    return Original(work, path.read_bytes(), header)


def mutate(data: bytes, op: str, at: int, xor: int) -> bytes:
    if op == "truncate":
        return data[:at]
    flipped = bytearray(data)
    flipped[at] ^= xor
    return bytes(flipped)


@FUZZ
@given(op=st.sampled_from(["truncate", "flip"]), where=st.floats(0, 1, exclude_max=True),
       xor=st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128, 255, 0x7F]))
def test_a_damaged_gguf_header_or_tensor_table_is_one_clear_error(gguf_file, op, where, xor):
    bad = gguf_file.work / "bad.gguf"
    bad.write_bytes(mutate(gguf_file.data, op, int(where * gguf_file.header), xor))
    check(str(bad), str(bad))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz-hf")
    tiny_hf(work / "good")
    weights = (work / "good" / "model.safetensors").read_bytes()
    return Original(work, weights, 8 + int.from_bytes(weights[:8], "little"))


@FUZZ
@given(op=st.sampled_from(["truncate", "flip"]), where=st.floats(0, 1, exclude_max=True),
       xor=st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128, 255, 0x7F]))
def test_a_damaged_safetensors_header_is_one_clear_error(hf_dir, op, where, xor):
    bad = hf_dir.work / "bad"
    if not bad.exists():
        shutil.copytree(hf_dir.work / "good", bad)
    (bad / "model.safetensors").write_bytes(
        mutate(hf_dir.data, op, int(where * (hf_dir.header + 16)), xor))
    check(str(bad), str(bad))


@pytest.fixture(scope="module")
def orbax_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz-orbax")
    model = Model(TINY_LLAMA)
    orbax_format.save(str(work / "good"), TINY_LLAMA, model.canonical_params(model.init_random()))
    files = sorted(os.path.relpath(os.path.join(d, f), work / "good")
                   for d, _, names in os.walk(work / "good") for f in names
                   if not f.endswith(".json") or "params" in d)
    return work, files


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data(), op=st.sampled_from(["remove", "truncate", "flip"]))
def test_an_orbax_checkpoint_with_a_missing_or_damaged_file_is_one_clear_error(orbax_dir, data, op):
    work, files = orbax_dir
    bad = work / "bad"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(work / "good", bad)
    victim = bad / data.draw(st.sampled_from(files), label="file")
    if op == "remove":
        victim.unlink()
    else:
        content = victim.read_bytes()
        at = data.draw(st.integers(0, max(len(content) - 1, 0)), label="at")
        victim.write_bytes(mutate(content, op, at, data.draw(st.integers(1, 255), label="xor"))
                           if content else b"\x00")
    check(str(bad), str(bad))
