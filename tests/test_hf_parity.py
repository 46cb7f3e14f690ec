"""Parity with HF transformers on the real bundled checkpoints (the same GGUF files):
prompt logits within 1e-4 of the reference's scale (2e-4 past 512 tokens), 64-token greedy
continuations identical.

Our side loads through `jaxgen.checkpoints.load` by bundled name, which converts the GGUF into
the (test-private) cache on first use, so the Orbax path is what is compared.
"""

import os

import numpy as np
import pytest
import torch

from jaxgen import checkpoints
from jaxgen.checkpoints.registry import bundled
from jaxgen.sampling_params import SamplingParams
from tests.helpers import engine_for, packed_metadata

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Translate to French: The weather is lovely today, isn't it?",
    "東京は日本の首都です。大阪は",
    # > 512 tokens: exercises Gemma's sliding window (local layers see only the last 512).
    "Once upon a time, " + " ".join(f"the {i}th knight rode to castle {i * 7 % 13}." for i in range(90)),
]


@pytest.fixture(scope="module", params=["gemma3-270m", "smollm2-135m"])
def pair(request, cache_dir):
    ours = checkpoints.load(request.param, cache=cache_dir)
    from transformers import AutoModelForCausalLM

    path = bundled(request.param).locate_gguf()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32)
    hf.eval()
    return ours, hf


def test_prompt_logits_match_hf(pair):
    import jax
    import jax.numpy as jnp

    ours, hf = pair
    tok = ours.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    assert max(len(i) for i in ids) > 512
    page_size = 16
    pages_per_seq = max(-(-len(i) // page_size) for i in ids)
    table = 1 + np.arange(len(ids) * pages_per_seq).reshape(len(ids), pages_per_seq)
    pages = ours.model.init_kv_pages(1 + table.size, page_size)
    md = packed_metadata([(len(i), len(i)) for i in ids], table)
    tokens = jnp.asarray(np.concatenate(ids), jnp.int32)
    positions = jnp.asarray(np.concatenate([np.arange(len(i)) for i in ids]), jnp.int32)
    logits, _ = jax.jit(ours.model.forward)(ours.params, tokens, positions, pages, md)
    logits = np.asarray(logits)
    start = 0
    for seq in ids:
        with torch.no_grad():
            want = hf(torch.tensor([seq])).logits[0].float().numpy()
        got = logits[start:start + len(seq)]
        start += len(seq)
        err, scale = np.abs(got - want).max(), np.abs(want).max()
        # float32 rounding over 18 layers and a 1,097-token context differs by CPU: on an
        # AVX-512 AMD EPYC (Zen 5) box the long prompt sat at 1.14e-4 of scale (7.4e-5 with the
        # reference attention backend), under 1e-4 on the boxes before it; short prompts ~2e-6.
        tol = 1e-4 if len(seq) <= 512 else 2e-4
        assert err <= tol * scale, f"max|Δ|={err} > {tol}·{scale} for a {len(seq)}-token prompt"


def test_greedy_continuations_match_hf(pair):
    ours, hf = pair
    tok = ours.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    stop = sorted(tok.stop_ids)
    # Continuous batching with the long prompt prefilled in 512-token chunks.
    engine = engine_for(ours.model, ours.params, tok, num_slots=8, max_model_len=2048,
                        max_prefill_tokens=512, decode_steps=8, num_pages=1024)
    got = engine.generate(ids, SamplingParams(max_tokens=64, temperature=0.0))
    for seq, completion in zip(ids, got):
        with torch.no_grad():
            out = hf.generate(torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long),
                              max_new_tokens=64, do_sample=False, eos_token_id=stop, pad_token_id=stop[0])
        want = out[0, len(seq):].tolist()
        assert list(completion.token_ids) == want, tok.decode(want)
