"""Static-batch generation over the paged KV cache: prefill every prompt in one packed call,
then decode all of them together, `decode_steps` tokens per device call.

This is the offline path of `jaxgen generate` until the continuous-batching engine takes over;
it owns a trivial page assignment (each sequence gets a contiguous run of pages, page 0 is the
null page) and knows nothing about tokenisation beyond stop ids.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.models import AttentionMetadata, Model
from jaxgen.runtime.steps import make_decode, make_prefill

NULL_PAGE = 0


def bucket(n: int, minimum: int = 16) -> int:
    """Next power of two >= n (>= minimum): few distinct shapes, so few compilations."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # generated ids, a final stop id included
    finish_reason: str  # "stop" (a stop id was produced) or "length" (max_tokens reached)


class Generator:
    """Compiled prefill/decode for one model; reused across `generate` calls."""

    def __init__(self, model: Model, params, *, page_size: int = 16, decode_steps: int = 8):
        if page_size % 16:
            raise ValueError(f"page_size={page_size}: must be a multiple of 16")
        if decode_steps < 1:
            raise ValueError(f"decode_steps={decode_steps}: must be >= 1")
        self.model, self.params = model, params
        self.page_size = page_size
        self.decode_steps = decode_steps
        self._prefill = make_prefill(model)
        self._decode = make_decode(model, decode_steps)

    def generate(self, prompts: list[list[int]], *, max_tokens: int, stop_ids=frozenset(),
                 temperature: float = 0.0, seed: int = 0) -> list[Completion]:
        if not prompts:
            return []
        self._validate(prompts, max_tokens, temperature)
        n = len(prompts)
        rows = bucket(n, 1)
        lens = np.array([len(p) for p in prompts], np.int32)
        # Room for the prompt, max_tokens, and the extra tokens of the last decode call.
        span = int(lens.max()) + max_tokens + self.decode_steps
        pages_per_seq = bucket(-(-span // self.page_size), 1)
        page_indices = np.full((rows, pages_per_seq), NULL_PAGE, np.int32)
        for s in range(n):
            page_indices[s] = 1 + s * pages_per_seq + np.arange(pages_per_seq)
        kv_pages = self.model.init_kv_pages(1 + n * pages_per_seq, self.page_size)

        temperature_row = jnp.full((rows,), temperature, jnp.float32)
        seeds = jnp.full((rows,), seed, jnp.uint32)
        first, kv_pages = self._run_prefill(prompts, lens, rows, page_indices, kv_pages,
                                            temperature_row, seeds)

        out = [[int(t)] for t in np.asarray(first)[:n]]
        done = [self._finished(o, max_tokens, stop_ids) for o in out]
        tokens = first
        positions = jnp.asarray(np.pad(lens, (0, rows - n)))
        num_seqs = jnp.array([n], jnp.int32)
        page_indices = jnp.asarray(page_indices)
        while not all(done):
            steps, kv_pages = self._decode(self.params, kv_pages, tokens, positions, page_indices,
                                           num_seqs, temperature_row, seeds)
            tokens, positions = steps[-1], positions + self.decode_steps
            for s, column in enumerate(np.asarray(steps)[:, :n].T):
                for t in column:
                    if done[s]:
                        break
                    out[s].append(int(t))
                    done[s] = self._finished(out[s], max_tokens, stop_ids)
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

    @staticmethod
    def _finished(out: list[int], max_tokens: int, stop_ids) -> bool:
        return out[-1] in stop_ids or len(out) >= max_tokens

    def _run_prefill(self, prompts, lens, rows, page_indices, kv_pages, temperature, seeds):
        n = len(prompts)
        total = int(lens.sum())
        padded = bucket(total)
        tokens = np.zeros(padded, np.int32)
        positions = np.zeros(padded, np.int32)
        tokens[:total] = np.concatenate(prompts)
        positions[:total] = np.concatenate([np.arange(l) for l in lens])
        cu = np.full(rows + 1, total, np.int32)
        cu[: n + 1] = np.concatenate([[0], np.cumsum(lens)])
        kv_lens = np.zeros(rows, np.int32)
        kv_lens[:n] = lens
        last_rows = np.maximum(cu[1:] - 1, 0)
        md = AttentionMetadata(jnp.asarray(kv_lens), jnp.asarray(page_indices), jnp.asarray(cu),
                               jnp.array([n], jnp.int32))
        return self._prefill(self.params, kv_pages, jnp.asarray(tokens), jnp.asarray(positions),
                             md, jnp.asarray(last_rows), temperature, seeds)
