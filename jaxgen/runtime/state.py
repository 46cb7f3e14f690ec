"""The decode-state pytree: what the device keeps per slot between steps.

Per slot: the next input token (sampled last step, never copied to host first), the page-table
row, sampling parameters, the prompt length and the token statistics penalties need. Lives on
device, donated into every step. Positions and which slots are active come from the host's
`StepPlan` each call, so host and device can never disagree about them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxgen.runtime.sampling import SamplingRows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    tokens: jax.Array  # i32[S] next input token of each slot
    page_table: jax.Array  # i32[S, P] page ids, null page 0 past the allocated ones
    rows: SamplingRows  # per-slot sampling parameters
    prompt_len: jax.Array  # i32[S] tokens at positions below this are prompt, the rest output
    prompt_seen: jax.Array  # bool[S, V] token occurs in the prompt (repetition penalty)
    output_counts: jax.Array  # i32[S, V] occurrences in the output (all penalties)

    @classmethod
    def create(cls, slots: int, pages_per_seq: int, vocab: int) -> "DecodeState":
        return cls(
            tokens=jnp.zeros((slots,), jnp.int32),
            page_table=jnp.zeros((slots, pages_per_seq), jnp.int32),
            rows=SamplingRows.zeros(slots),
            prompt_len=jnp.zeros((slots,), jnp.int32),
            prompt_seen=jnp.zeros((slots, vocab), bool),
            output_counts=jnp.zeros((slots, vocab), jnp.int32),
        )


def state_shardings(state: DecodeState, mesh) -> DecodeState:
    """Where each field lives on `mesh`: per-slot rows replicated, the `[S, V]` token statistics
    split over the vocabulary as the logits they are read with are (replicated when `model`
    does not divide V). Every step returns the state with exactly these (`steps._placed`)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxgen.models.sharding import partition_spec

    by_vocab = NamedSharding(mesh, partition_spec((None, "vocab"), state.output_counts.shape, mesh))
    shardings = jax.tree.map(lambda a: NamedSharding(mesh, PartitionSpec(*[None] * a.ndim)), state)
    return dataclasses.replace(shardings, prompt_seen=by_vocab, output_counts=by_vocab)


def insert(state: DecodeState, slots, rows: SamplingRows, prompt_len) -> DecodeState:
    """Places new requests: `slots i32[S]` (entries equal to S are padding) get sampling `rows`
    (`[S]` each, aligned with `slots`) and `prompt_len i32[S]`; their penalty statistics reset.
    With pages, inserting is bookkeeping only: no K/V moves."""
    set_rows = lambda old, new: old.at[slots].set(new, mode="drop")
    return dataclasses.replace(
        state,
        rows=jax.tree.map(set_rows, state.rows, rows),
        prompt_len=set_rows(state.prompt_len, prompt_len),
        prompt_seen=state.prompt_seen.at[slots].set(False, mode="drop"),
        output_counts=state.output_counts.at[slots].set(0, mode="drop"),
    )
