"""Speculative decoding with n-gram drafts: the proposer against a rescanning slow twin; greedy
output identical with and without speculation (tiny models with staggered arrivals, preemption
and aborts; the real Gemma 3 270M and SmolLM2); sampled output keeps the target distribution (a
chi-square test that an uncorrected acceptance fails); seeds independent of batch mates; stop
conditions, logprobs and max_tokens; no compilation after warm-up; metrics and usage."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxgen.config import EngineConfig
from jaxgen.engine import Engine
from jaxgen.models import Model
from jaxgen.sampling_params import SamplingParams
from jaxgen.scheduler.ngram import NgramConfig, NgramProposer
from tests.helpers import TINY_GEMMA3, TINY_LLAMA, ByteTokenizer

BASE = dict(num_slots=4, page_size=16, max_model_len=192, decode_steps=4, max_prefill_tokens=64,
            num_pages=64, warmup=False)
SPEC = dict(speculative="ngram", num_speculative_tokens=4, ngram_max=3, ngram_min=1)
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


def slow_proposal(tokens, cfg: NgramConfig, limit=None):
    """Rescan: the longest suffix n-gram's latest earlier occurrence, what followed it."""
    k = cfg.num_speculative_tokens if limit is None else min(limit, cfg.num_speculative_tokens)
    for n in range(min(cfg.ngram_max, len(tokens)), cfg.ngram_min - 1, -1):
        suffix = tokens[len(tokens) - n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tuple(tokens[start + n:start + n + k])
    return ()


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=40), st.lists(
    st.integers(1, 5), min_size=1, max_size=6), st.integers(1, 3), st.integers(0, 2))
def test_proposer_equals_a_rescan_as_tokens_arrive(prompt, steps, ngram_min, extra):
    cfg = NgramConfig(num_speculative_tokens=3, ngram_min=ngram_min, ngram_max=ngram_min + extra,
                      min_acceptance=0.0)
    proposer, tokens = NgramProposer(cfg, prompt), list(prompt)
    rng = np.random.default_rng(len(prompt))
    for n in steps:
        assert proposer.propose() == slow_proposal(tokens, cfg)
        assert proposer.propose(limit=1) == slow_proposal(tokens, cfg, 1)
        new = rng.integers(0, 5, n).tolist()
        proposer.extend(new)
        tokens += new


def test_drafts_that_keep_failing_pause_proposals():
    cfg = NgramConfig(num_speculative_tokens=4, ngram_min=1, ngram_max=2, min_acceptance=0.5,
                      cooldown=5, max_cooldown=20)
    p = NgramProposer(cfg, [1, 2, 3, 1, 2])
    assert p.propose() == (3, 1, 2)
    p.record(4, 0)
    p.record(4, 0)  # the average falls below 0.5: cooling down for 5 tokens
    assert not p.active and p.propose() == ()
    p.extend([3, 1, 2, 3, 1])
    assert p.active and p.propose()
    assert (p.proposed, p.accepted) == (8, 0)
    # A trial after the cooldown: one failing verify ends it, and the next cooldown is twice
    # as long (then 20, capped at max_cooldown=20).
    for cooldown in (10, 20, 20):
        p.record(4, 1)
        assert not p.active
        p.extend([2] * (cooldown - 1))
        assert not p.active
        p.extend([2])
        assert p.active
    # A trial that pays (at or above the threshold) goes on, and resets the cooldown to 5.
    p.record(4, 2)
    assert p.active
    p.record(4, 0)  # the average (0.5) falls to 0.35
    assert not p.active
    p.extend([2] * 5)
    assert p.active


def test_cooldown_settings_are_checked():
    with pytest.raises(ValueError, match="max_cooldown=4: must be an integer >= cooldown=5"):
        NgramConfig(cooldown=5, max_cooldown=4)
    with pytest.raises(ValueError, match="cooldown=0: must be an integer >= 1"):
        NgramConfig(cooldown=0)


@pytest.fixture(scope="module", params=[TINY_GEMMA3, TINY_LLAMA], ids=["gemma3", "llama"])
def tiny(request):
    """Both architectures: for what a model's layers could change (greedy identity)."""
    model = Model(request.param)
    return model, model.init_random(seed=3)


@pytest.fixture(scope="module")
def tiny_llama():
    """One architecture, for what happens past the logits (acceptance, sampling, stops,
    limits, seeds, compilation), which no layer of the model reaches."""
    model = Model(TINY_LLAMA)
    return model, model.init_random(seed=3)


def repetitive(n, seed=0, period=7, repeats=3):
    """Prompts that repeat a pattern: drafts get proposed from the first decode step on."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 256, period).tolist() * repeats for _ in range(n)]


def engine(tiny, **kw):
    model, params = tiny
    return Engine(model, params, ByteTokenizer(), EngineConfig(**{**BASE, **kw}))


def test_step_times_refuse_a_runner_without_verify_and_a_position_past_the_length(tiny_llama):
    """`ModelRunner.step_times` (tools/bench_verify.py): times both programs at a position, and
    names what it cannot time."""
    runner = engine(tiny_llama, **SPEC).runner
    limit = runner.cfg.max_model_len - 4 - 1
    token_s, verify_s = runner.step_times(limit, reps=1)
    assert token_s > 0 and verify_s > 0
    with pytest.raises(ValueError, match=rf"position={limit + 1}: must be within 0..{limit}"):
        runner.step_times(limit + 1)
    with pytest.raises(ValueError, match="position=-1"):
        runner.step_times(-1)
    with pytest.raises(ValueError, match="reps=0: must be an integer >= 1"):
        runner.step_times(reps=0)
    assert runner.num_drafts == runner.cfg.num_drafts == 4
    with pytest.raises(ValueError, match="no speculative decoding"):
        engine(tiny_llama).runner.step_times()


def test_greedy_output_is_identical_with_staggered_arrivals_preemption_and_aborts(tiny):
    """More requests than slots (staggered admission), a pool too small for all of them
    (preemption), an abort mid-run: every token equals the run without speculation."""
    prompts = repetitive(10) + [list(range(1, 30))]
    params = [dataclasses.replace(GREEDY, max_tokens=40 + 5 * i) for i in range(len(prompts))]
    small = dict(num_pages=16)
    plain = engine(tiny, **small).generate(prompts, params)
    spec_engine = engine(tiny, **small, **SPEC)
    spec = spec_engine.generate(prompts, params)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    s = spec_engine.scheduler
    assert s.num_preemptions > 0 and s.num_draft_tokens > 0 and s.num_accepted_draft_tokens > 0
    assert s.num_pages_used == 0 and s.num_running == 0
    # An abort while speculating frees slot and pages; the others are unchanged.
    e = engine(tiny, **SPEC)
    streams = [e.add_request(p, GREEDY) for p in prompts[:3]]
    e.step()
    e.step()
    e.abort(streams[1].request_id)
    while e.has_work():
        e.step()
    results = [st.result() for st in streams]
    assert results[1].finish_reason == "abort"
    for i in (0, 2):  # greedy: the first 40 tokens of the longer run above
        assert results[i].token_ids == plain[i].token_ids[:GREEDY.max_tokens]
    assert e.scheduler.num_pages_used == 0


def test_stops_max_tokens_logprobs_and_opt_out_match_plain_decoding(tiny_llama):
    """Stop ids (ByteTokenizer's 0) and stop strings are never streamed past, max_tokens is
    never exceeded, and logprobs are those of the emitted tokens; a request may opt out."""
    prompts = repetitive(4, seed=2)
    text = [bytes(p).decode("latin-1") for p in prompts]
    params = [SamplingParams(max_tokens=30, temperature=0.0, logprobs=2),
              SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0.0, stop=(text[2][3:5],)),
              SamplingParams(max_tokens=30, temperature=0.0, speculative=False)]
    plain = engine(tiny_llama).generate(prompts, params)
    spec = engine(tiny_llama, **SPEC).generate(prompts, params)
    for a, b in zip(plain, spec):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
    assert len(spec[1].token_ids) == 7
    np.testing.assert_allclose([lp.logprob for lp in spec[0].logprobs],
                               [lp.logprob for lp in plain[0].logprobs], rtol=1e-4, atol=1e-4)
    assert [lp.top[0][0] for lp in spec[0].logprobs] == [lp.top[0][0] for lp in plain[0].logprobs]
    assert spec[3].usage.draft_tokens == 0 and spec[0].usage.draft_tokens > 0


def _first_tokens(e: Engine, prompt, seeds, n_tokens, temperature):
    params = [SamplingParams(max_tokens=n_tokens, temperature=temperature, seed=s,
                             ignore_eos=True) for s in seeds]
    return np.array([c.token_ids for c in e.generate([prompt] * len(seeds), params)])


def _chi_square(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample chi-square statistic over the categories seen, per degree of freedom."""
    cats = sorted(set(a.tolist()) | set(b.tolist()))
    table = np.array([[np.sum(a == c) for c in cats], [np.sum(b == c) for c in cats]], float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    return float(((table - expected) ** 2 / expected).sum() / max(len(cats) - 1, 1))


@pytest.mark.optimized
def test_sampled_output_keeps_the_target_distribution(tiny_llama, monkeypatch):
    """Tokens 2..4 of many seeded requests, with and without speculation, come from one
    distribution; accepting drafts without the rejection-sampling correction does not."""
    import jax.numpy as jnp

    from jaxgen.runtime import runner, sampling, steps
    from jaxgen.scheduler import config as scheduler_config_module

    # Drafts at every step (no cooldown), so the test sees many accepted and rejected ones.
    monkeypatch.setattr(scheduler_config_module, "DEFAULT_MIN_ACCEPTANCE", 0.0)
    # Every token occurs in the prompt: whatever is sampled, the n-gram index drafts what
    # followed it there, which the model mostly does not want (rejections) and sometimes does.
    prompt = list(range(1, 256))
    seeds, temperature = range(480), 0.05  # the tiny model's logits are small: sharpened
    kw = dict(num_slots=16, num_pages=400, max_model_len=272, speculative_max_batch=16)
    plain = _first_tokens(engine(tiny_llama, **kw), prompt, seeds, 4, temperature)
    spec_engine = engine(tiny_llama, **kw, **SPEC)
    spec = _first_tokens(spec_engine, prompt, seeds, 4, temperature)
    s = spec_engine.scheduler
    assert s.num_draft_tokens > 300 and s.num_accepted_draft_tokens < s.num_draft_tokens
    stats = [_chi_square(plain[:, i], spec[:, i]) for i in range(1, 4)]
    print("chi-square per degree of freedom, with / without speculation:", stats)
    assert max(stats) < 2.0, stats

    def uncorrected(logits, drafts, draft_lens, rows, positions, level):
        """Every draft accepted, as speculation without the correction would emit."""
        out = sampling.verify_drafts(logits, drafts, draft_lens, rows, positions, level)
        j = jnp.arange(drafts.shape[1] + 1)[None]
        tokens = jnp.where(j < draft_lens[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), out.tokens)
        return dataclasses.replace(out, tokens=tokens, counts=draft_lens + 1)

    monkeypatch.setattr(steps, "verify_drafts", uncorrected)
    # Runners of one model and config share their step functions (`runner._step_functions`):
    # the next engine must trace verify afresh, with the uncorrected acceptance, and no later
    # one may reuse that.
    monkeypatch.setattr(runner, "_STEP_FUNCTIONS", collections.OrderedDict())
    wrong = _first_tokens(engine(tiny_llama, **kw, **SPEC), prompt, seeds, 4, temperature)
    stats = [_chi_square(plain[:, i], wrong[:, i]) for i in range(1, 4)]
    print("... and uncorrected:", stats)
    assert max(stats) > 5.0, stats


def test_verify_draws_every_emitted_token_from_the_target_distribution():
    """`verify_drafts` alone, on known distributions and many seeds: the first emitted token
    (draft accepted, or the residual drawn) and the one after an accepted draft follow the
    target's probabilities; a filter (top-k) is honoured."""
    import jax
    import jax.numpy as jnp

    from jaxgen.runtime.sampling import SamplingRows, verify_drafts
    from jaxgen.sampling_params import DRAW, FILTER

    n, v = 6000, 6
    p0 = np.array([0.4, 0.3, 0.15, 0.1, 0.05, 0.0])
    p1 = np.array([0.1, 0.2, 0.3, 0.25, 0.1, 0.05])
    logits = jnp.log(jnp.asarray(np.stack([p0, p1, p1]) + 1e-12, jnp.float32))
    logits = jnp.broadcast_to(logits, (n, 3, v))
    drafts = jnp.tile(jnp.array([[1, 2]], jnp.int32), (n, 1))  # p0(1) = 0.3: mostly rejected
    rows = SamplingRows(*(jnp.full((n,), x, jnp.float32) for x in (1.0,)),
                        top_k=jnp.zeros(n, jnp.int32), top_p=jnp.ones(n), min_p=jnp.zeros(n),
                        repetition_penalty=jnp.ones(n), presence_penalty=jnp.zeros(n),
                        frequency_penalty=jnp.zeros(n), seed=jnp.arange(n, dtype=jnp.uint32))
    out = jax.jit(verify_drafts, static_argnums=5)(logits, drafts, jnp.full(n, 2, jnp.int32),
                                                   rows, jnp.full(n, 10, jnp.int32), DRAW)
    tokens, counts = np.asarray(out.tokens), np.asarray(out.counts)

    def close(sample, p):
        freq = np.bincount(sample, minlength=v) / len(sample)
        assert np.abs(freq - p).max() < 4 * np.sqrt(0.25 / len(sample)), (freq, p)

    close(tokens[:, 0], p0)
    close(tokens[counts >= 2, 1], p1)  # after the first draft was accepted
    assert abs((counts >= 2).mean() - 0.3) < 0.03
    filtered = dataclasses.replace(rows, top_k=jnp.full(n, 2, jnp.int32))
    out = jax.jit(verify_drafts, static_argnums=5)(logits, drafts, jnp.full(n, 2, jnp.int32),
                                                   filtered, jnp.full(n, 10, jnp.int32), FILTER)
    close(np.asarray(out.tokens)[:, 0], np.array([0.4, 0.3, 0, 0, 0, 0]) / 0.7)


def test_nobody_drafts_while_the_batch_is_above_the_limit(tiny_llama):
    """Four requests of equal length run together: with --speculative-max-batch 2 they never
    draft (and plan ahead as without speculation); with 4 they do; the tokens are the same."""
    prompts = repetitive(4, seed=9)
    runs = {}
    for limit in (2, 4):
        e = engine(tiny_llama, **SPEC, speculative_max_batch=limit)
        runs[limit] = [c.token_ids for c in e.generate(prompts, GREEDY)]
        assert (e.scheduler.num_draft_tokens > 0) == (limit == 4)
    assert runs[2] == runs[4]


def test_seeded_speculative_output_ignores_batch_mates(tiny_llama):
    prompt = repetitive(1, seed=6)[0]
    mine = SamplingParams(max_tokens=24, temperature=0.9, seed=123, ignore_eos=True)
    alone = engine(tiny_llama, **SPEC).generate([prompt], mine)[0].token_ids
    mates = repetitive(3, seed=7)
    crowd = engine(tiny_llama, **SPEC).generate(mates + [prompt], [
        SamplingParams(max_tokens=30, temperature=1.0, seed=i, ignore_eos=True) for i in range(3)]
        + [mine])[3].token_ids
    assert alone == crowd


def test_no_compilation_after_warm_up_and_metrics_count_drafts(tiny_llama):
    from jaxgen.metrics import ServingMetrics

    e = engine(tiny_llama, warmup=True, **SPEC)
    metrics = ServingMetrics(e)
    prompts = repetitive(6, seed=8)
    e.generate(prompts, [GREEDY, SamplingParams(max_tokens=20, temperature=0.8, seed=1, top_p=0.9),
                         SamplingParams(max_tokens=20, temperature=0.0, logit_bias=((5, 3.0),)),
                         GREEDY, GREEDY, GREEDY])
    assert e.runner.compilations_after_warmup == 0
    drafted = metrics.registry.get_sample_value("jaxgen_draft_tokens_total")
    accepted = metrics.registry.get_sample_value("jaxgen_accepted_draft_tokens_total")
    assert drafted == e.scheduler.num_draft_tokens > 0 and 0 < accepted <= drafted
    assert metrics.registry.get_sample_value("jaxgen_draft_accepted_length_count") > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma3-270m", "smollm2-135m"])
def test_real_models_greedy_output_is_identical(name, cache_dir):
    """A copy-heavy prompt (repeat a passage) through the real checkpoints, float32."""
    from jaxgen import checkpoints

    loaded = checkpoints.load(name, cache=cache_dir)
    passage = ("The river rises in the hills, runs through the old town under seven bridges, "
               "and reaches the sea at the harbour where the fishing boats come in at dawn.")
    prompt = loaded.tokenizer.encode(f"Repeat this sentence exactly.\n{passage}\n{passage}\n")
    params = SamplingParams(max_tokens=32, temperature=0.0)
    config = dict(num_slots=2, max_model_len=256, num_pages=64, decode_steps=4,
                  max_prefill_tokens=128, warmup=False)
    runs = {}
    for spec in (False, True):
        e = Engine(loaded.model, loaded.params, loaded.tokenizer,
                   EngineConfig(**config, **(SPEC if spec else {})))
        runs[spec] = e.generate([prompt], params)[0]
    assert runs[True].token_ids == runs[False].token_ids
    assert runs[True].usage.accepted_draft_tokens > 10  # it copies: most drafts are kept
