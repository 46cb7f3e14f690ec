"""Tiny random Llama and Gemma 3 checkpoints written by transformers' own `save_pretrained`
(safetensors + config.json), loaded through our importer: logits and greedy continuations
match the HF model that wrote them."""

import numpy as np
import pytest
import torch

from jaxgen import checkpoints
from jaxgen.checkpoints.registry import bundled
from jaxgen.sampling_params import SamplingParams
from jaxgen.tokenizer import tokenizer_from_gguf
from tests.helpers import engine_for, full_forward_logits

VOCAB = 49152  # SmolLM2's tokenizer is saved next to the weights


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32})


def _gemma3_config():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        sliding_window=8, query_pre_attn_scalar=24, initializer_range=0.2,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        })


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_from_gguf(bundled("smollm2-135m").locate_gguf())


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def checkpoint(request, tmp_path_factory, tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = _llama_config() if request.param == "llama" else _gemma3_config()
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a missing (1 + w) would show
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if request.param == "gemma3" else 1.0))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    tokenizer.save(path)
    return str(path), hf


def test_logits_match(checkpoint):
    path, hf = checkpoint
    loaded = checkpoints.load(path)
    ids = np.random.default_rng(0).integers(0, VOCAB, 40).tolist()  # longer than the window
    got = full_forward_logits(loaded.model, loaded.params, ids)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_greedy_matches(checkpoint):
    path, hf = checkpoint
    loaded = checkpoints.load(path)
    prompts = [loaded.tokenizer.encode("Hello there, how are"), [5, 99, 1234, 8]]
    engine = engine_for(loaded.model, loaded.params, loaded.tokenizer)
    got = engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    for prompt, completion in zip(prompts, got):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
        assert list(completion.token_ids) == out[0, len(prompt):].tolist()
