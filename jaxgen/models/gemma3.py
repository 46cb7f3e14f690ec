"""Gemma 3 text decoder: interleaved local (sliding-window) and global layers, QK-norm,
pre- and post-norms around attention and MLP, GeLU-tanh MLP, embeddings scaled by sqrt(dim)
and tied to the output head."""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from jaxgen.models.config import ModelConfig
from jaxgen.models.layers import (Attention, GatedMLP, RMSNorm, blocked_logits, embed_lookup,
                                  embedding_table, param, run_blocks, tied_logits)


class Gemma3Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs, attn_backend: str):
        dt, e, eps = jnp.dtype(cfg.dtype), cfg.hidden_size, cfg.rms_norm_eps
        self.pre_attn_norm = RMSNorm(e, eps, dt, rngs, zero_centered=True)
        self.attn = Attention(cfg, layer, rngs, attn_backend)
        self.post_attn_norm = RMSNorm(e, eps, dt, rngs, zero_centered=True)
        self.pre_mlp_norm = RMSNorm(e, eps, dt, rngs, zero_centered=True)
        self.mlp = GatedMLP(cfg, rngs)
        self.post_mlp_norm = RMSNorm(e, eps, dt, rngs, zero_centered=True)

    def __call__(self, x, positions, kv_pages, md):
        h, kv_pages = self.attn(self.pre_attn_norm(x), positions, kv_pages, md)
        x = x + self.post_attn_norm(h)
        x = x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x)))
        return x, kv_pages


class Gemma3(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, attn_backend: str = "auto",
                 embed_major: bool = False, shared_trace: bool = True):
        dt = jnp.dtype(cfg.dtype)
        self.shared_trace = shared_trace
        self.embed = embedding_table(cfg, rngs, embed_major)
        self.embed_major = embed_major
        self.blocked_logits = blocked_logits(attn_backend)
        self.layers = nnx.List(
            [Gemma3Block(cfg, i, rngs, attn_backend) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt, rngs, zero_centered=True)
        self.embed_scale = math.sqrt(cfg.hidden_size)
        self.final_logit_softcap = cfg.final_logit_softcap

    def __call__(self, tokens, positions, kv_pages, md, logits_indices=None):
        table = self.embed[...]
        # The reference rounds the scale to the weights' dtype before multiplying.
        x = embed_lookup(table, tokens, self.embed_major) * jnp.asarray(self.embed_scale,
                                                                         table.dtype)
        x, new_pages = run_blocks(self.layers, self.final_norm, x, positions, kv_pages, md,
                                  logits_indices, self.shared_trace)
        logits = tied_logits(x, table, self.embed_major, self.blocked_logits).astype(jnp.float32)
        if self.final_logit_softcap is not None:
            cap = self.final_logit_softcap
            logits = cap * jnp.tanh(logits / cap)
        return logits, new_pages
