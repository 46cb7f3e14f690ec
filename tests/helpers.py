"""Shared test code: tiny model configs, packed-batch metadata, and the naive slow twins
(full-forward greedy decode) that the fast paths are compared against."""

from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.models import AttentionMetadata, Model, ModelConfig

TINY_GEMMA3 = ModelConfig(
    architecture="gemma3", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4,
    num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6, rope_theta=1e6,
    rope_local_theta=1e4, max_position_embeddings=1024, sliding_window=12,
    sliding_window_pattern=2, query_pre_attn_scalar=24.0, final_logit_softcap=30.0,
    attn_logit_softcap=50.0)
TINY_LLAMA = ModelConfig(
    architecture="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=3,
    num_heads=8, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=5e5,
    max_position_embeddings=1024, tie_embeddings=False)


def packed_metadata(seqs: list[tuple[int, int]], page_indices: np.ndarray, rows: int | None = None):
    """AttentionMetadata for sequences given as (kv_len after step, q_len this step)."""
    rows = rows or len(seqs)
    kv_lens = np.zeros(rows, np.int32)
    cu = np.zeros(rows + 1, np.int32)
    for s, (kv_len, q_len) in enumerate(seqs):
        kv_lens[s] = kv_len
        cu[s + 1] = cu[s] + q_len
    cu[len(seqs) + 1:] = cu[len(seqs)]
    return AttentionMetadata(jnp.asarray(kv_lens), jnp.asarray(page_indices, jnp.int32),
                             jnp.asarray(cu), jnp.array([len(seqs)], jnp.int32))


_FORWARD: "weakref.WeakKeyDictionary[Model, object]" = weakref.WeakKeyDictionary()


def full_forward_logits(model: Model, params, ids: list[int], page_size: int = 16) -> np.ndarray:
    """Logits of every position of one sequence from a single fresh prefill: the slow twin.

    The sequence is padded to a power-of-two length (padding rows lie past `cu_q_lens[1]`, so
    they are ignored) to keep compilations few across calls.
    """
    n = len(ids)
    padded = max(16, 1 << (n - 1).bit_length())
    pages_needed = padded // page_size
    pages = model.init_kv_pages(pages_needed + 1, page_size)
    md = packed_metadata([(n, n)], np.arange(1, pages_needed + 1)[None])
    tokens = np.zeros(padded, np.int32)
    tokens[:n] = ids
    fwd = _FORWARD.setdefault(model, jax.jit(model.forward))
    logits, _ = fwd(params, jnp.asarray(tokens), jnp.arange(padded, dtype=jnp.int32), pages, md)
    return np.asarray(logits)[:n]


def naive_greedy(model: Model, params, prompt: list[int], max_tokens: int, stop_ids=()) -> list[int]:
    """Greedy decode by re-running the full forward over the whole sequence for every token."""
    ids = list(prompt)
    out = []
    for _ in range(max_tokens):
        nxt = int(full_forward_logits(model, params, ids)[-1].argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt in stop_ids:
            break
    return out


class ByteTokenizer:
    """A tokenizer whose ids are bytes (vocab 256): text is computable by hand in engine tests.
    Id 0 is the stop id."""

    stop_ids = frozenset({0})
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i != 0).decode("utf-8", errors="replace")

    def skips(self, id: int) -> bool:  # no id writes text only when special tokens are kept
        return False


def engine_for(model: Model, params, tokenizer, *, warmup: bool = False, prefix_cache: bool = True,
               overlap_launch: bool = False, **runner):
    """An Engine with test-sized defaults (overridable via EngineConfig fields)."""
    from jaxgen.config import EngineConfig
    from jaxgen.engine import Engine

    defaults = dict(num_slots=4, page_size=16, max_model_len=128, decode_steps=4,
                    max_prefill_tokens=32, num_pages=64)
    defaults.update(runner)
    return Engine(model, params, tokenizer, EngineConfig(
        **defaults, warmup=warmup, enable_prefix_cache=prefix_cache,
        overlap_launch=overlap_launch))


def gguf_without_vocabulary(path: str, out_dir) -> str:
    """A copy of the GGUF at `path` without its tokenizer's arrays (tokens, scores, token types,
    merges), with `<arch>.vocab_size` set from them where it is not stored, written into
    `out_dir`; the tensors (as stored, quantized blocks included) and every other metadata entry
    are the same. For loading HF's model from it: HF's `from_pretrained(gguf_file=...)` parses the
    metadata twice with `gguf.GGUFReader`, slow over Gemma 3's 262,144-entry vocabulary
    (docs/reliability.md), which its model does not use (HF's tokenizer parity is
    tests/test_tokenizer.py's)."""
    import os

    import gguf

    from jaxgen.gguf_reader import GGUFFile

    source = GGUFFile(path)
    arch = source.fields["general.architecture"].value
    out = os.path.join(str(out_dir), os.path.basename(path))
    writer = gguf.GGUFWriter(out, arch)
    vocab = len(source.fields["tokenizer.ggml.tokens"].value)
    for key, field in source.fields.items():
        if key == "general.architecture" or (key.startswith("tokenizer.ggml.")
                                             and field.element_type is not None):
            continue
        sub = gguf.GGUFValueType(field.element_type) if field.element_type is not None else None
        writer.add_key_value(key, field.value, gguf.GGUFValueType(field.value_type), sub)
    if f"{arch}.vocab_size" not in source.fields:
        writer.add_uint32(f"{arch}.vocab_size", vocab)
    for t in source.tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
