"""Static-batch generation on the `ModelRunner`: every prompt gets a slot and a contiguous run
of pages, all are prefilled in one step, then decoded together until each stops.

The offline path of `jaxgen generate` until the continuous-batching engine takes it over; it
builds its own `StepPlan`s with a trivial page assignment (page 0 is the null page) and knows
nothing about tokenisation beyond stop ids.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxgen.models import Model
from jaxgen.runtime.runner import ModelRunner, RunnerConfig
from jaxgen.sampling_params import SamplingParams
from jaxgen.scheduler.plan import PrefillChunk, SlotAssignment, StepPlan


def bucket(n: int, minimum: int = 16) -> int:
    """Next power of two >= n (>= minimum): few distinct shapes, so few compilations."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # generated ids, a final stop id included
    finish_reason: str  # "stop" (a stop id was produced) or "length" (max_tokens reached)


class Generator:
    def __init__(self, model: Model, params, *, page_size: int = 16, decode_steps: int = 8):
        if page_size % 16:
            raise ValueError(f"page_size={page_size}: must be a multiple of 16")
        if decode_steps < 1:
            raise ValueError(f"decode_steps={decode_steps}: must be >= 1")
        self.model, self.params = model, params
        self.page_size, self.decode_steps = page_size, decode_steps

    def generate(self, prompts: list[list[int]], *, max_tokens: int, stop_ids=frozenset(),
                 temperature: float = 0.0, seed: int = 0) -> list[Completion]:
        if not prompts:
            return []
        self._validate(prompts, max_tokens, temperature)
        n = len(prompts)
        longest = max(len(p) for p in prompts)
        cfg = RunnerConfig(num_slots=bucket(n, 1), page_size=self.page_size,
                           max_model_len=bucket(longest + max_tokens),
                           decode_steps=self.decode_steps,
                           max_prefill_tokens=bucket(sum(len(p) for p in prompts)))
        cfg = dataclasses.replace(cfg, num_pages=1 + n * cfg.pages_per_seq)
        runner = ModelRunner(self.model, self.params, cfg)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
        tables = {s: tuple(range(1 + s * cfg.pages_per_seq, 1 + (s + 1) * cfg.pages_per_seq))
                  for s in range(n)}
        plan = StepPlan(
            step=0,
            prefills=tuple(PrefillChunk(str(s), s, 0, tuple(p), True) for s, p in enumerate(prompts)),
            page_table_updates=tables,
            assignments=tuple(SlotAssignment(s, str(s), params, seed, tuple(p))
                              for s, p in enumerate(prompts)),
        )
        out = [[int(t)] for t in runner.execute(plan).prefill_tokens]
        done = [o[-1] in stop_ids or len(o) >= max_tokens for o in out]
        step = 1
        while not all(done):
            slots = tuple(range(n))
            positions = tuple(len(p) + len(o) - 1 for p, o in zip(prompts, out))
            # Finished rows keep decoding (discarded) so every row's position stays in step.
            plan = StepPlan(step=step, decode_slots=slots, decode_positions=positions,
                            num_steps=self.decode_steps)
            columns = runner.execute(plan).decode_tokens[:, :n].T
            for s, column in enumerate(columns):
                for t in column:
                    if done[s]:
                        out[s].append(-1)  # placeholder keeps positions aligned; stripped below
                        continue
                    out[s].append(int(t))
                    done[s] = out[s][-1] in stop_ids or len(out[s]) >= max_tokens
            step += 1
        out = [[t for t in o if t >= 0] for o in out]
        return [Completion(list(p), o, "stop" if o[-1] in stop_ids else "length")
                for p, o in zip(prompts, out)]

    def _validate(self, prompts, max_tokens: int, temperature: float) -> None:
        cfg = self.model.config
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens}: must be >= 1")
        if temperature < 0 or not np.isfinite(temperature):
            raise ValueError(f"temperature={temperature}: must be a finite number >= 0")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompts[{i}] is empty: a prompt needs at least one token")
            if len(p) + max_tokens > cfg.max_position_embeddings:
                raise ValueError(
                    f"prompts[{i}]: {len(p)} prompt tokens + max_tokens={max_tokens} exceeds the "
                    f"model's context of {cfg.max_position_embeddings}")
            bad = [t for t in p if not 0 <= t < cfg.vocab_size]
            if bad:
                raise ValueError(f"prompts[{i}]: token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
