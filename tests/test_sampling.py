"""Per-slot sampling against a numpy oracle: penalties, greedy, top-k / top-p / min-p filters
and the distribution they leave, logprobs, seeds independent of the row and batch, and the
sampling levels (each exact for the rows it serves)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.runtime.sampling import SamplingRows, apply_penalties, sample
from jaxgen.sampling_params import DRAW, FILTER, GREEDY, SAMPLING_LEVELS, SamplingParams

V = 12


def rows(n, **kw):
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                presence_penalty=0.0, frequency_penalty=0.0, seed=0)
    base.update(kw)
    dtype = {"top_k": jnp.int32, "seed": jnp.uint32}
    return SamplingRows(**{k: jnp.broadcast_to(jnp.asarray(v, dtype.get(k, jnp.float32)), (n,))
                           for k, v in base.items()})


def allowed(logits, temperature, top_k, top_p, min_p):
    """Numpy oracle: the set of token ids the filters keep, and their renormalised probs."""
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    k = top_k or len(z)
    kept = order[:k]
    pk = p[kept] / p[kept].sum()
    cum_before = np.cumsum(pk) - pk
    kept = kept[(cum_before < top_p) & (pk >= min_p * pk[0])]
    keep[kept] = True
    keep[order[0]] = True
    q = np.where(keep, p, 0)
    return keep, q / q.sum()


def draws(logits, r, n=3000):
    """Tokens drawn for one logits row at n different positions (n independent keys)."""
    b = logits[None].repeat(n, 0)
    rr = jax.tree.map(lambda a: jnp.broadcast_to(a[:1], (n,)), r)
    zeros_b, zeros_i = jnp.zeros((n, V), bool), jnp.zeros((n, V), jnp.int32)
    out = jax.jit(sample)(jnp.asarray(b), rr, jnp.arange(n, dtype=jnp.int32), zeros_b, zeros_i)
    return np.asarray(out.tokens)


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_p=0.6), dict(min_p=0.2),
                                dict(top_k=5, top_p=0.8, temperature=0.7), dict(temperature=1.5)])
def test_filters_keep_the_oracle_set_and_distribution(kw):
    logits = np.random.default_rng(0).normal(size=V).astype(np.float32) * 2
    r = rows(1, **kw)
    got = draws(logits, r)
    keep, q = allowed(logits, kw.get("temperature", 1.0), kw.get("top_k", 0),
                      kw.get("top_p", 1.0), kw.get("min_p", 0.0))
    assert set(np.unique(got)) <= set(np.flatnonzero(keep))
    freq = np.bincount(got, minlength=V) / len(got)
    np.testing.assert_allclose(freq, q, atol=0.035)


def test_penalties_match_formula():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, V)).astype(np.float32)
    prompt_seen = np.zeros((2, V), bool)
    prompt_seen[0, [1, 2]] = True
    counts = np.zeros((2, V), np.int32)
    counts[0, [2, 5]] = [3, 1]
    counts[1, 7] = 2
    r = rows(2, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)
    got = np.asarray(apply_penalties(jnp.asarray(logits), r, jnp.asarray(prompt_seen),
                                     jnp.asarray(counts)))
    want = logits.copy()
    seen = prompt_seen | (counts > 0)
    want = np.where(seen, np.where(want > 0, want / 1.3, want * 1.3), want)
    want -= 0.25 * counts + 0.5 * (counts > 0)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_greedy_logprobs_and_top_alternatives():
    logits = np.random.default_rng(2).normal(size=(3, V)).astype(np.float32)
    r = rows(3, temperature=0.0)
    out = sample(jnp.asarray(logits), r, jnp.zeros(3, jnp.int32), jnp.zeros((3, V), bool),
                 jnp.zeros((3, V), jnp.int32))
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_array_equal(np.asarray(out.tokens), logits.argmax(-1))
    np.testing.assert_allclose(np.asarray(out.logprobs), lp.max(-1), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.top_ids)[:, 0], logits.argmax(-1))
    assert np.all(np.diff(np.asarray(out.top_logprobs), axis=-1) <= 0)


def test_seed_and_position_alone_decide_the_draw():
    logits = np.random.default_rng(3).normal(size=V).astype(np.float32)
    batch = np.stack([np.zeros(V, np.float32), logits, logits * 3])
    temperature = jnp.asarray([0.0, 1.0, 0.5])
    seeds = jnp.asarray([7, 42, 9], jnp.uint32)
    base = rows(3)
    r = SamplingRows(temperature, base.top_k, base.top_p.at[2].set(0.5), base.min_p,
                     base.repetition_penalty, base.presence_penalty, base.frequency_penalty, seeds)
    z = (jnp.zeros((3, V), bool), jnp.zeros((3, V), jnp.int32))
    pos = jnp.asarray([4, 11, 2], jnp.int32)
    in_batch = int(sample(jnp.asarray(batch), r, pos, *z).tokens[1])
    alone = sample(jnp.asarray(logits[None]), rows(1, seed=42), pos[1:2],
                   jnp.zeros((1, V), bool), jnp.zeros((1, V), jnp.int32))
    assert in_batch == int(alone.tokens[0])


def test_sampling_level_of_params():
    assert SamplingParams(temperature=0.0).sampling_level == GREEDY
    assert SamplingParams(temperature=0.0, top_p=0.5, top_k=3).sampling_level == GREEDY
    assert SamplingParams(temperature=0.0, logprobs=0).sampling_level == DRAW
    assert SamplingParams(temperature=0.0, presence_penalty=0.5).sampling_level == DRAW
    assert SamplingParams(temperature=0.0, repetition_penalty=1.1).sampling_level == DRAW
    assert SamplingParams(temperature=0.7).sampling_level == DRAW
    assert SamplingParams(temperature=0.7, top_k=5).sampling_level == FILTER
    assert SamplingParams(temperature=0.7, top_p=0.9).sampling_level == FILTER
    assert SamplingParams(temperature=0.7, min_p=0.1).sampling_level == FILTER


def test_every_level_is_exact_for_the_rows_it_serves():
    """A row needing level L gets the same token at every level >= L (the fast levels are not
    approximations), whatever its batch mates need; logprobs agree wherever computed."""
    rng = np.random.default_rng(5)
    kinds = [  # (row params, level it needs)
        (dict(temperature=0.0), GREEDY),
        (dict(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.7), DRAW),
        (dict(temperature=1.3), DRAW),
        (dict(temperature=0.8, presence_penalty=-1.0), DRAW),
        (dict(temperature=0.9, top_p=0.7), FILTER),
        (dict(temperature=1.1, top_k=4, min_p=0.05), FILTER),
    ]
    reps = 40  # each kind at 40 positions: 40 independent draws
    n = len(kinds) * reps
    cols = {k: np.array([kw.get(k, d) for kw, _ in kinds] * reps)
            for k, d in dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                             repetition_penalty=1.0, presence_penalty=0.0,
                             frequency_penalty=0.0).items()}
    dtype = {"top_k": jnp.int32}
    r = SamplingRows(**{k: jnp.asarray(v, dtype.get(k, jnp.float32)) for k, v in cols.items()},
                     seed=jnp.asarray(rng.integers(0, 2**31, n), jnp.uint32))
    logits = jnp.asarray(rng.normal(size=(n, V)).astype(np.float32) * 3)
    seen = jnp.asarray(rng.random((n, V)) < 0.3)
    counts = jnp.asarray(rng.integers(0, 3, (n, V)), jnp.int32)
    pos = jnp.asarray(rng.integers(0, 1000, n), jnp.int32)
    out = {lv: jax.jit(sample, static_argnums=5)(logits, r, pos, seen, counts, lv)
           for lv in SAMPLING_LEVELS}
    need = np.array([lv for _, lv in kinds] * reps)
    for lv in SAMPLING_LEVELS:
        served = need <= lv
        np.testing.assert_array_equal(np.asarray(out[lv].tokens)[served],
                                      np.asarray(out[FILTER].tokens)[served], err_msg=f"{lv=}")
    served = need <= DRAW
    np.testing.assert_array_equal(np.asarray(out[DRAW].logprobs)[served],
                                  np.asarray(out[FILTER].logprobs)[served])
    np.testing.assert_array_equal(np.asarray(out[DRAW].top_ids), np.asarray(out[FILTER].top_ids))
    assert np.all(np.asarray(out[GREEDY].logprobs) == 0)
    # Not vacuous: the random rows really drew (not all argmax), and penalties moved tokens.
    drawn = np.asarray(out[FILTER].tokens) != np.asarray(logits).argmax(-1)
    assert drawn[need == DRAW].any() and drawn[need == FILTER].any()


def test_logit_bias_moves_the_greedy_choice_and_sparse_rows_are_exact():
    """A bias of -100 on the argmax removes it, +100 on another token forces it; unused entries
    (id 0, bias 0) change nothing, so a row without a bias samples exactly as before."""
    from jaxgen.sampling_params import MAX_LOGIT_BIAS

    logits = jnp.asarray(np.random.default_rng(5).normal(size=(3, V)).astype(np.float32))
    top = np.asarray(logits).argmax(-1)
    ids = np.zeros((3, MAX_LOGIT_BIAS), np.int32)
    values = np.zeros((3, MAX_LOGIT_BIAS), np.float32)
    ids[0, 0], values[0, 0] = top[0], -100.0  # the greedy token, pushed away
    ids[1, 0], values[1, 0] = (top[1] + 1) % V, 100.0  # another token, forced
    r = dataclasses.replace(rows(3, temperature=0.0), bias_ids=jnp.asarray(ids),
                            bias_values=jnp.asarray(values))
    z = (jnp.zeros((3, V), bool), jnp.zeros((3, V), jnp.int32))
    pos = jnp.zeros(3, jnp.int32)
    out = np.asarray(sample(logits, r, pos, *z, level=DRAW).tokens)
    assert out[0] != top[0] and out[1] == (top[1] + 1) % V and out[2] == top[2]
    plain = sample(logits, rows(3, temperature=0.0), pos, *z, level=DRAW)
    assert int(plain.tokens[2]) == out[2]
    np.testing.assert_array_equal(np.asarray(sample(logits, r, pos, *z, level=DRAW).logprobs[2]),
                                  np.asarray(plain.logprobs[2]))
