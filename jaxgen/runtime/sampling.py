"""Per-slot sampling with traced parameters: changing a request's parameters never recompiles.

Order (as vLLM): logit bias, then penalties on the raw logits -> logprobs (of the penalised distribution) ->
greedy rows take the argmax; other rows divide by temperature, then top-k, top-p and min-p
filter, then draw. A row's random stream is `fold_in(key(seed), position)`, so a seeded request
samples the same tokens whatever its batch mates are.

Which stages run is the static `level` (`jaxgen.sampling_params.SAMPLING_LEVELS`), picked on
host from the requests in the step: an all-greedy step is one argmax, and the full-vocabulary
sort runs only in steps whose requests filter. No `lax.cond`: on GPU a conditional copies its
predicate to host and blocks the host until the device is idle, which inside the decode loop
would drain the launch queue several times per token. Every stage is exact for rows that do not
use it, so a row's tokens do not depend on the level its batch mates chose.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxgen.sampling_params import DRAW, FILTER, GREEDY, MAX_LOGIT_BIAS, MAX_LOGPROBS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingRows:
    """Per-slot sampling parameters, each `[S]`; the logit bias `[S, MAX_LOGIT_BIAS]` (a sparse
    row: token ids and their biases, unused entries id 0 with bias 0)."""

    temperature: jax.Array  # f32, 0 = greedy
    top_k: jax.Array  # i32, 0 = off
    top_p: jax.Array  # f32, 1 = off
    min_p: jax.Array  # f32, 0 = off
    repetition_penalty: jax.Array  # f32, 1 = off
    presence_penalty: jax.Array  # f32
    frequency_penalty: jax.Array  # f32
    seed: jax.Array  # u32
    # None: no row has a bias (callers that sample outside the engine's decode state).
    bias_ids: jax.Array | None = None  # i32[S, MAX_LOGIT_BIAS]
    bias_values: jax.Array | None = None  # f32[S, MAX_LOGIT_BIAS]

    @classmethod
    def zeros(cls, slots: int) -> "SamplingRows":
        f = lambda v: jnp.full((slots,), v, jnp.float32)
        return cls(f(0.0), jnp.zeros((slots,), jnp.int32), f(1.0), f(0.0), f(1.0), f(0.0), f(0.0),
                   jnp.zeros((slots,), jnp.uint32), jnp.zeros((slots, MAX_LOGIT_BIAS), jnp.int32),
                   jnp.zeros((slots, MAX_LOGIT_BIAS), jnp.float32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampled:
    tokens: jax.Array  # i32[B]
    logprobs: jax.Array  # f32[B] of the chosen tokens
    top_ids: jax.Array  # i32[B, min(MAX_LOGPROBS, V)]
    top_logprobs: jax.Array  # f32[B, MAX_LOGPROBS]


def apply_penalties(logits, rows: SamplingRows, prompt_seen, output_counts):
    """`logits f32[B, V]`; `prompt_seen bool[B, V]`; `output_counts i32[B, V]`.

    Repetition divides positive (multiplies negative) logits of every token seen in prompt or
    output; presence and frequency subtract for tokens of the output only.
    """
    seen = prompt_seen | (output_counts > 0)
    rp = rows.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rp, logits * rp), logits)
    counts = output_counts.astype(jnp.float32)
    logits = logits - rows.frequency_penalty[:, None] * counts
    return logits - rows.presence_penalty[:, None] * (counts > 0)


def _filtered(scaled, rows: SamplingRows):
    """Top-k / top-p / min-p as a mask over `scaled f32[B, V]` (logits / temperature)."""
    vocab = scaled.shape[-1]
    order = jnp.argsort(-scaled, axis=-1)
    ranked = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(rows.top_k > 0, rows.top_k, vocab)[:, None]
    keep = rank < k
    probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each candidate
    keep &= before < rows.top_p[:, None]
    keep &= probs >= rows.min_p[:, None] * probs[:, :1]
    keep = keep.at[:, 0].set(True)  # the top candidate always survives
    # A row without filters keeps every token exactly (the cumulative sum may reach 1 early).
    unfiltered = (rows.top_k <= 0) & (rows.top_p >= 1.0) & (rows.min_p <= 0.0)
    keep |= unfiltered[:, None]
    mask = jnp.zeros_like(keep).at[jnp.arange(scaled.shape[0])[:, None], order].set(keep)
    return jnp.where(mask, scaled, -jnp.inf)


def _logprobs(logits, tokens):
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_logprobs, top_ids = jax.lax.top_k(logprobs, min(MAX_LOGPROBS, logprobs.shape[-1]))
    return chosen, top_ids.astype(jnp.int32), top_logprobs


def _no_logprobs(logits, tokens):
    n = min(MAX_LOGPROBS, logits.shape[-1])
    b = logits.shape[0]
    return (jnp.zeros((b,), jnp.float32), jnp.zeros((b, n), jnp.int32),
            jnp.zeros((b, n), jnp.float32))


@jax.named_scope("sampling")
def sample(logits, rows: SamplingRows, positions, prompt_seen, output_counts,
           level: int = FILTER) -> Sampled:
    """`logits f32[B, V]`, `positions i32[B]` (index of the token being sampled) -> `Sampled`.

    `level` (static) bounds the stages: GREEDY takes the argmax of the raw logits and returns
    zero logprobs (penalty statistics are not read); DRAW adds the logit bias, penalties,
    logprobs and the draw for rows with temperature > 0; FILTER adds top-k / top-p / min-p.
    """
    if level not in (GREEDY, DRAW, FILTER):
        raise ValueError(f"level={level!r}: must be one of GREEDY, DRAW, FILTER")
    logits = logits.astype(jnp.float32)
    if level == GREEDY:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return Sampled(tokens, *_no_logprobs(logits, tokens))
    if rows.bias_ids is not None:
        logits = logits.at[jnp.arange(logits.shape[0])[:, None], rows.bias_ids].add(rows.bias_values)
    logits = apply_penalties(logits, rows, prompt_seen, output_counts)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(rows.temperature, 1e-6)[:, None]
    if level == FILTER:
        scaled = _filtered(scaled, rows)
    keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(rows.seed, positions)
    drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    tokens = jnp.where(rows.temperature > 0, drawn, greedy)
    return Sampled(tokens, *_logprobs(logits, tokens))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Verified:
    """What a verify step emits per slot: `tokens i32[S, K+1]`, of which the first `counts i32[S]`
    (accepted drafts, then one token of the model's own) are emitted; logprobs as `Sampled`'s,
    with a leading [S, K+1]."""

    tokens: jax.Array
    counts: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


@jax.named_scope("verify_drafts")
def verify_drafts(logits, drafts, draft_lens, rows: SamplingRows, positions, level: int) -> Verified:
    """Speculative verification: `logits f32[S, K+1, V]` are the model's at the slot's inputs
    (its last token, then the drafts `i32[S, K]`, `draft_lens i32[S]` of them real); `positions
    i32[S]` is each slot's first input position.

    Greedy rows accept the longest prefix of drafts equal to the argmax, plus the argmax after
    it: exactly what decoding one token at a time gives. Sampled rows use rejection sampling
    with the drafts as a point-mass proposal: draft j is accepted with probability p_j(d_j); at
    the first rejection the token is drawn from p_j with d_j removed (the residual), and after
    K accepted drafts from p_K: every emitted token has the target distribution. The random
    stream is the request's own (`fold_in(key(seed), position)`, the coin on a fold of it), so
    seeded output does not depend on batch mates. Penalties are not applied (the scheduler does
    not speculate for requests that use them); the logit bias and, at FILTER, top-k / top-p /
    min-p are.
    """
    s, w, v = logits.shape
    logits = logits.astype(jnp.float32)
    flat_rows = jax.tree.map(lambda a: jnp.repeat(a, w, axis=0), rows)
    flat = logits.reshape(s * w, v)
    if level != GREEDY and flat_rows.bias_ids is not None:
        flat = flat.at[jnp.arange(s * w)[:, None], flat_rows.bias_ids].add(flat_rows.bias_values)
    greedy = jnp.argmax(flat, axis=-1).astype(jnp.int32).reshape(s, w)
    j = jnp.arange(w)[None, :]
    valid = j[:, :-1] < draft_lens[:, None]  # [S, K]
    if level == GREEDY:
        accept = valid & (drafts == greedy[:, :-1])
        n = jnp.sum(jnp.cumprod(accept, axis=1), axis=1)
        tokens = jnp.where(j < n[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), greedy)
        zeros = _no_logprobs(flat, tokens.reshape(-1))
        return Verified(tokens, n + 1, *(z.reshape(s, w, *z.shape[1:]) for z in zeros))
    scaled = flat / jnp.maximum(flat_rows.temperature, 1e-6)[:, None]
    if level == FILTER:
        scaled = _filtered(scaled, flat_rows)
    scaled = scaled.reshape(s, w, v)
    token_positions = positions[:, None] + j + 1  # each emitted token's place in the sequence
    keys = jax.vmap(jax.vmap(lambda seed, p: jax.random.fold_in(jax.random.key(seed), p)))(
        jnp.broadcast_to(rows.seed[:, None], (s, w)), token_positions)
    probs = jax.nn.softmax(scaled, axis=-1)
    p_draft = jnp.take_along_axis(probs[:, :-1], drafts[..., None], axis=-1)[..., 0]
    coins = jax.vmap(jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1))))(keys[:, :-1])
    sampled_rows = rows.temperature > 0
    accept = valid & jnp.where(sampled_rows[:, None], coins < p_draft, drafts == greedy[:, :-1])
    n = jnp.sum(jnp.cumprod(accept, axis=1), axis=1)  # accepted drafts
    at_n = lambda a: jnp.take_along_axis(a, n[:, None, None], axis=1)[:, 0]  # noqa: E731
    rejected = n < draft_lens
    d_n = jnp.take_along_axis(jnp.pad(drafts, ((0, 0), (0, 1))), n[:, None], axis=1)[:, 0]
    residual = jnp.where(rejected[:, None] & (jnp.arange(v)[None] == d_n[:, None]), -jnp.inf,
                         at_n(scaled))
    key_n = jnp.take_along_axis(keys, n[:, None], axis=1)[:, 0]
    drawn = jax.vmap(jax.random.categorical)(key_n, residual).astype(jnp.int32)
    last = jnp.where(sampled_rows, drawn, jnp.take_along_axis(greedy, n[:, None], axis=1)[:, 0])
    tokens = jnp.where(j < n[:, None], jnp.pad(drafts, ((0, 0), (0, 1))),
                       jnp.where(j == n[:, None], last[:, None], greedy))
    chosen, top_ids, top_logprobs = _logprobs(flat, tokens.reshape(-1))
    return Verified(tokens, n + 1, chosen.reshape(s, w), top_ids.reshape(s, w, -1),
                    top_logprobs.reshape(s, w, -1))
