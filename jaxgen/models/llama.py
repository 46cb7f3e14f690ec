"""Llama decoder (Llama 3, SmolLM2): GQA, RoPE with optional Llama-3 scaling, SwiGLU MLP,
pre-norms, tied or untied output head."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxgen.models.config import ModelConfig
from jaxgen.models.layers import (Attention, GatedMLP, RMSNorm, blocked_logits, embed_lookup,
                                  embedding_table, output_logits, param, run_blocks,
                                  tied_logits)


class LlamaBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs, attn_backend: str):
        dt, e, eps = jnp.dtype(cfg.dtype), cfg.hidden_size, cfg.rms_norm_eps
        self.attn_norm = RMSNorm(e, eps, dt, rngs, zero_centered=False)
        self.attn = Attention(cfg, layer, rngs, attn_backend)
        self.mlp_norm = RMSNorm(e, eps, dt, rngs, zero_centered=False)
        self.mlp = GatedMLP(cfg, rngs)

    def __call__(self, x, positions, kv_pages, md):
        h, kv_pages = self.attn(self.attn_norm(x), positions, kv_pages, md)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), kv_pages


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, attn_backend: str = "auto",
                 embed_major: bool = False, shared_trace: bool = True):
        dt = jnp.dtype(cfg.dtype)
        self.shared_trace = shared_trace
        self.embed = embedding_table(cfg, rngs, embed_major)
        self.embed_major = embed_major
        self.blocked_logits = blocked_logits(attn_backend)
        self.layers = nnx.List(
            [LlamaBlock(cfg, i, rngs, attn_backend) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt, rngs, zero_centered=False)
        self.lm_head = None if cfg.tie_embeddings else param(
            rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dt)

    def __call__(self, tokens, positions, kv_pages, md, logits_indices=None):
        x = embed_lookup(self.embed[...], tokens, self.embed_major)
        x, new_pages = run_blocks(self.layers, self.final_norm, x, positions, kv_pages, md,
                                  logits_indices, self.shared_trace)
        if self.lm_head is None:
            logits = tied_logits(x, self.embed[...], self.embed_major, self.blocked_logits)
        else:
            logits = output_logits(x, self.lm_head[...], 1, self.blocked_logits)
        return logits.astype(jnp.float32), new_pages
