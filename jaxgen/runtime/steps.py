"""Jitted pure step functions over the paged KV cache: `prefill` (packed prompt chunks) and
`generate` (k decode steps for every slot in an on-device loop).

Both take the page pools and the decode state donated and return them updated; sampled tokens
stay on device in the state for the next step, and are also returned (one array per call) for the
host to read. Both take the sampling `level` (static, see `jaxgen.runtime.sampling`) of the
requests they serve; a GREEDY decode loop neither reads nor updates the [S, V] penalty
statistics (no request of the step uses them, and a slot's statistics reset when a request is
placed in it). Knows nothing about requests or scheduling: it sees page tables, positions,
slots.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxgen.models import AttentionMetadata, Model
from jaxgen.runtime.sampling import Sampled, sample, verify_drafts
from jaxgen.runtime.state import DecodeState, insert
from jaxgen.sampling_params import GREEDY


def _take_rows(tree, index):
    return jax.tree.map(lambda a: a[index], tree)


def _placed(placement, *outputs) -> dict:
    """`jax.jit`'s out_shardings for a step returning `outputs`, each "pages", "state" or None
    (as XLA likes): over a mesh (`placement`: the pools' sharding, the state's shardings) the
    pools and the state leave every step spelled exactly as they came in. Without it JAX
    spells an output's sharding after the step's first input (`P()` in one program,
    `P(None, None)` in another), jit keys its cache on the spelling, and the next step
    compiles again."""
    if placement is None:
        return {}
    where = {"pages": placement[0], "state": placement[1], None: None}
    shardings = tuple(where[o] for o in outputs)
    return {"out_shardings": shardings if len(shardings) > 1 else shardings[0]}


def make_insert(placement=None):
    """`insert(state, slots i32[S], rows SamplingRows [S], prompt_len i32[S]) -> state`
    (`jaxgen.runtime.state.insert`, the state donated)."""
    return jax.jit(jax.named_scope("insert")(insert), donate_argnums=(0,),
                   **_placed(placement, "state"))


def make_prefill(model: Model, settled=lambda call: call, placement=None):
    """`prefill(params, kv_pages, state, tokens i32[T], positions i32[T], row_slots i32[T],
    chunk_slots i32[C], cu_q_lens i32[C+1], num_chunks i32[1], sample_mask bool[C], *, level)
    -> (Sampled [C], kv_pages, state)`.

    Chunk c of slot `chunk_slots[c]` holds rows `cu_q_lens[c]:cu_q_lens[c+1]`; its K/V go into that
    slot's pages; where `sample_mask[c]`, the token sampled from its last row becomes the slot's
    next input token. `row_slots` is the slot of each row (S for padding rows).

    Two programs: the forward (one per token bucket, whatever the level) and the sampling of the
    chunks' last rows (one per level, shapes independent of the bucket), so the sampling levels
    do not multiply the prefill compilations. `prefill.jitted` lists both. `settled` wraps
    each of them as it is called (the runner's `sync_dispatch`). `placement` (as every step's):
    where the page pools and the state stay over a mesh, (pages' sharding, state's shardings).
    """

    @functools.partial(jax.jit, donate_argnums=(1, 2),
                       **_placed(placement, None, None, "pages", "state"))
    @jax.named_scope("prefill")  # names the ops in profiles (jaxgen profile)
    def forward(params, kv_pages, state: DecodeState, tokens, positions, row_slots, chunk_slots,
                cu_q_lens, num_chunks):
        num_slots = state.tokens.shape[0]
        last_rows = jnp.maximum(cu_q_lens[1:] - 1, 0)
        kv_lens = jnp.where(jnp.arange(chunk_slots.shape[0]) < num_chunks[0],
                            positions[last_rows] + 1, 0)
        md = AttentionMetadata(kv_lens.astype(jnp.int32), state.page_table[chunk_slots],
                               cu_q_lens, num_chunks)
        logits, kv_pages = model.forward(params, tokens, positions, kv_pages, md, last_rows)
        # Penalty statistics (kept at every level: a few scattered rows): prompt positions mark
        # `prompt_seen`, later ones (outputs being recomputed after a preemption) count as output.
        safe = jnp.minimum(row_slots, num_slots - 1)
        is_prompt = positions < state.prompt_len[safe]
        pad = row_slots >= num_slots
        state = dataclasses.replace(
            state,
            prompt_seen=state.prompt_seen.at[jnp.where(is_prompt & ~pad, row_slots, num_slots),
                                             tokens].set(True, mode="drop"),
            output_counts=state.output_counts.at[
                jnp.where(~is_prompt & ~pad, row_slots, num_slots), tokens].add(1, mode="drop"))
        return logits, positions[last_rows] + 1, kv_pages, state

    @functools.partial(jax.jit, donate_argnums=(0,), static_argnames=("level",),
                       **_placed(placement, None, "state"))
    def pick(state: DecodeState, logits, next_positions, chunk_slots, sample_mask, *, level):
        num_slots = state.tokens.shape[0]
        sampled = sample(logits, _take_rows(state.rows, chunk_slots), next_positions,
                         state.prompt_seen[chunk_slots], state.output_counts[chunk_slots], level)
        target = jnp.where(sample_mask, chunk_slots, num_slots)
        state = dataclasses.replace(
            state, tokens=state.tokens.at[target].set(sampled.tokens, mode="drop"),
            output_counts=state.output_counts.at[target, sampled.tokens].add(1, mode="drop"))
        return sampled, state

    run_forward, run_pick = settled(forward), settled(pick)

    def prefill(params, kv_pages, state, tokens, positions, row_slots, chunk_slots, cu_q_lens,
                num_chunks, sample_mask, *, level):
        logits, next_positions, kv_pages, state = run_forward(
            params, kv_pages, state, tokens, positions, row_slots, chunk_slots, cu_q_lens,
            num_chunks)
        sampled, state = run_pick(state, logits, next_positions, chunk_slots, sample_mask,
                                  level=level)
        return sampled, kv_pages, state

    prefill.jitted = (forward, pick)
    return prefill


def make_generate(model: Model, num_steps: int, placement=None):
    """`generate(params, kv_pages, state, positions i32[S], active bool[S], *, level)
    -> (Sampled with leading [num_steps, S], kv_pages, state)`.

    Every active slot feeds `state.tokens` at `positions` and samples `num_steps` tokens in an
    on-device loop; inactive slots have kv_len 0 (they neither read nor write pages).
    """

    @functools.partial(jax.jit, donate_argnums=(1, 2), static_argnames=("level",),
                       **_placed(placement, None, "pages", "state"))
    @jax.named_scope("generate")
    def generate(params, kv_pages, state: DecodeState, positions, active, *, level):
        num_slots = state.tokens.shape[0]
        cu_q_lens = jnp.arange(num_slots + 1, dtype=jnp.int32)
        num_seqs = jnp.array([num_slots], jnp.int32)
        slot_ids = jnp.arange(num_slots)

        keep_counts = level != GREEDY

        def step(carry, _):
            tokens, positions, kv_pages, counts = carry
            kv_lens = jnp.where(active, positions + 1, 0).astype(jnp.int32)
            md = AttentionMetadata(kv_lens, state.page_table, cu_q_lens, num_seqs,
                                   decode_only=True)
            logits, kv_pages = model.forward(params, tokens, positions, kv_pages, md)
            out = sample(logits, state.rows, positions + 1, state.prompt_seen, counts, level)
            if keep_counts:
                counts = counts.at[jnp.where(active, slot_ids, num_slots), out.tokens].add(
                    1, mode="drop")
            return (out.tokens, positions + 1, kv_pages, counts), out

        # At GREEDY the [S, V] counts stay out of the loop carry (None: an empty pytree).
        init = (state.tokens, positions, kv_pages, state.output_counts if keep_counts else None)
        (tokens, _, kv_pages, counts), out = jax.lax.scan(step, init, None, length=num_steps)
        state = dataclasses.replace(state, tokens=jnp.where(active, tokens, state.tokens),
                                    output_counts=counts if keep_counts else state.output_counts)
        return out, kv_pages, state

    return generate


def make_verify(model: Model, num_drafts: int, placement=None):
    """`verify(params, kv_pages, state, slots i32[C], drafts i32[C, K], draft_lens i32[C],
    positions i32[C], *, level) -> (Verified [C], kv_pages, state)`: speculative decoding's step.

    Each of the C drafting slots (`slots`; entries equal to S are padding) feeds its last token
    (`state.tokens`, on device) and its `draft_lens` drafts at `positions`, `positions + 1`, ...
    as one ragged query of the batch (the kernels take ragged query lengths), writes their K/V,
    and keeps the tokens `verify_drafts` accepts; the slot's next input becomes the last of
    them. K/V of rejected drafts stay in the pages past the request's length, which the host
    moves only over accepted ones: nothing is copied. C is a bucket (1, 2, 4, ... slots), so a
    step computes rows for the requests that draft, not for every slot, and any mix of draft
    lengths within a bucket runs without recompiling.
    """
    width = num_drafts + 1

    @functools.partial(jax.jit, donate_argnums=(1, 2), static_argnames=("level",),
                       **_placed(placement, None, "pages", "state"))
    @jax.named_scope("verify")
    def verify(params, kv_pages, state: DecodeState, slots, drafts, draft_lens, positions, *,
               level):
        num_slots = state.tokens.shape[0]
        chunks = slots.shape[0]
        rows = chunks * width
        active = slots < num_slots
        safe = jnp.minimum(slots, num_slots - 1)
        q_lens = jnp.where(active, draft_lens + 1, 0).astype(jnp.int32)
        cu_q_lens = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(q_lens)]).astype(jnp.int32)
        inputs = jnp.concatenate([state.tokens[safe][:, None], drafts], axis=1)  # [C, K+1]
        offsets = jnp.arange(width)[None, :]
        # Chunk c's rows go to cu_q_lens[c] + j; rows past its length to `rows` (dropped).
        target = jnp.where(offsets < q_lens[:, None], cu_q_lens[:-1, None] + offsets, rows)
        tokens = jnp.zeros(rows, jnp.int32).at[target].set(inputs, mode="drop")
        token_positions = jnp.zeros(rows, jnp.int32).at[target].set(
            positions[:, None] + offsets, mode="drop")
        kv_lens = jnp.where(active, positions + q_lens, 0).astype(jnp.int32)
        md = AttentionMetadata(kv_lens, state.page_table[safe], cu_q_lens,
                               jnp.array([chunks], jnp.int32), max_q_len=width)
        logits, kv_pages = model.forward(params, tokens, token_positions, kv_pages, md)
        logits = logits[jnp.minimum(cu_q_lens[:-1, None] + offsets, rows - 1)]  # [C, K+1, V]
        rows_of = jax.tree.map(lambda a: a[safe], state.rows)
        out = verify_drafts(logits, drafts, draft_lens, rows_of, positions, level)
        last = jnp.take_along_axis(out.tokens, (out.counts - 1)[:, None], axis=1)[:, 0]
        target_slots = jnp.where(active, slots, num_slots)
        state = dataclasses.replace(state, tokens=state.tokens.at[target_slots].set(last, mode="drop"))
        return out, kv_pages, state

    return verify


__all__ = ["Sampled", "make_generate", "make_insert", "make_prefill", "make_verify"]
