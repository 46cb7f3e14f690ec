"""Per-row sampling from logits with traced parameters (changing them never recompiles).

A row's random stream is `fold_in(key(seed), position)`: the same request samples the same
tokens whatever its batch mates are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits: jax.Array, temperature: jax.Array, seeds: jax.Array, positions: jax.Array) -> jax.Array:
    """`logits f32[B, V]`, `temperature f32[B]` (0 = greedy), `seeds u32[B]`,
    `positions i32[B]` (index of the token being sampled) -> `i32[B]` tokens."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(row_logits, temp, seed, pos):
        key = jax.random.fold_in(jax.random.key(seed), pos)
        return jax.random.categorical(key, row_logits / jnp.maximum(temp, 1e-6)).astype(jnp.int32)

    sampled = jax.vmap(draw)(logits, temperature, seeds, positions)
    return jnp.where(temperature > 0, sampled, greedy)
