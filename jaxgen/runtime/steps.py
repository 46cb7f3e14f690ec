"""Jitted pure step functions: `prefill` and multi-step `decode` over the paged KV cache.

Both take the page pools donated and return them updated; sampled tokens stay on device until
the caller asks for them (decode runs `num_steps` tokens per call in an on-device loop, so the
host sees tokens once per `num_steps`). Knows nothing about requests or scheduling: it sees
page tables, lengths and per-row sampling arrays.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxgen.models import AttentionMetadata, Model
from jaxgen.runtime.sampling import sample


def make_prefill(model: Model):
    """`prefill(params, kv_pages, tokens i32[T], positions i32[T], md, last_rows i32[S],
    temperature f32[S], seeds u32[S]) -> (first tokens i32[S], kv_pages)`.

    Rows of `tokens` are the packed prompts described by `md`; `last_rows[s]` is the row of
    sequence s's last prompt token, whose logits give its first generated token.
    """

    @functools.partial(jax.jit, donate_argnums=(1,))
    def prefill(params, kv_pages, tokens, positions, md, last_rows, temperature, seeds):
        logits, kv_pages = model.forward(params, tokens, positions, kv_pages, md, last_rows)
        return sample(logits, temperature, seeds, positions[last_rows] + 1), kv_pages

    return prefill


def make_decode(model: Model, num_steps: int):
    """`decode(params, kv_pages, tokens i32[S], positions i32[S], page_indices i32[S, P],
    num_seqs i32[1], temperature f32[S], seeds u32[S]) -> (tokens i32[num_steps, S], kv_pages)`.

    Row s feeds `tokens[s]` at `positions[s]` and samples the next token, `num_steps` times.
    Rows at or past `num_seqs` are idle (kv_len 0: they neither read nor write pages).
    """

    @functools.partial(jax.jit, donate_argnums=(1,))
    def decode(params, kv_pages, tokens, positions, page_indices, num_seqs, temperature, seeds):
        rows = tokens.shape[0]
        live = jnp.arange(rows) < num_seqs[0]
        cu_q_lens = jnp.minimum(jnp.arange(rows + 1, dtype=jnp.int32), num_seqs[0])

        def step(carry, _):
            tokens, positions, kv_pages = carry
            md = AttentionMetadata(jnp.where(live, positions + 1, 0).astype(jnp.int32),
                                   page_indices, cu_q_lens, num_seqs)
            logits, kv_pages = model.forward(params, tokens, positions, kv_pages, md)
            nxt = sample(logits, temperature, seeds, positions + 1)
            return (nxt, positions + 1, kv_pages), nxt

        (_, _, kv_pages), out = jax.lax.scan(step, (tokens, positions, kv_pages), None,
                                             length=num_steps)
        return out, kv_pages

    return decode
