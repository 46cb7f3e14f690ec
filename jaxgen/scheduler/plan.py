"""The plain-data objects the scheduler and the runtime exchange each engine step.

`StepPlan` is everything the device side needs for one step (and nothing it does not):
prompt chunks to prefill, the slots to advance by `num_steps` decode tokens, page-table rows that
changed, and sampling parameters of requests newly placed in a slot. `StepOutput` is what comes
back: sampled token ids (and logprobs when asked for) as host numpy arrays. No jax here.

Positions and pages. A request in slot `s` with `n` tokens whose K/V are in its pages feeds its
next token at position `n`. A prefill chunk writes positions `start .. start+len-1`; a decode
step feeding position `p` writes `p, p+1, .., p+num_steps-1` (one per on-device step). Page-table
rows are padded with the null page 0, so decode writes past a request's last needed token land
in the null page. Lookahead steps (of any request) may read the null page back, but only to
produce tokens past a request's end, which the scheduler discards: nothing read from page 0
ever reaches a user.

Conventions: a released slot's row is sent as `()`; a slot released and reassigned in the same
plan appears only in `assignments`; an empty plan (`empty`) carries nothing for the device and
needs no `update()`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from jaxgen.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class PrefillChunk:
    request_id: str
    slot: int
    start: int  # position of token_ids[0] in the request's sequence
    token_ids: tuple[int, ...]
    sample: bool  # the chunk ends the known tokens: sample the next token from its last row
    serial: int = 0  # the request's `serial` (its id may be reused once it ends)


@dataclasses.dataclass(frozen=True)
class SlotAssignment:
    """A request newly placed in a slot (admission, or re-admission after preemption)."""

    slot: int
    request_id: str
    params: SamplingParams
    seed: int  # params.seed, or the one the engine picked
    # Tokens already in the sequence that count for repetition/presence/frequency penalties
    # (the prompt, plus outputs so far after a preemption).
    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class StepPlan:
    step: int
    prefills: tuple[PrefillChunk, ...] = ()
    # Slots advancing by `num_steps` tokens, with the position of their input token (the last
    # sampled one, already on device) and the serial of the request decoding there: a slot may
    # change hands while the plan is in flight, and its tokens go only to that request.
    decode_slots: tuple[int, ...] = ()
    decode_positions: tuple[int, ...] = ()
    decode_serials: tuple[int, ...] = ()
    num_steps: int = 1
    # Speculative decoding: slots that verify drafts this step instead of decoding (see
    # `StepOutput.verify_tokens`), with their first input position, serial and drafts.
    verify_slots: tuple[int, ...] = ()
    verify_positions: tuple[int, ...] = ()
    verify_serials: tuple[int, ...] = ()
    verify_drafts: tuple[tuple[int, ...], ...] = ()
    # slot -> that slot's full page list (row of the page table), for rows that changed.
    page_table_updates: Mapping[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    assignments: tuple[SlotAssignment, ...] = ()
    freed_slots: tuple[int, ...] = ()  # slots released this step (finished/aborted/preempted)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.prefills)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decode_slots and not self.verify_slots


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """Host arrays for one executed plan.

    prefill_tokens: i32[len(plan.prefills)] token sampled after each chunk (meaningful only where
      `chunk.sample`); decode_tokens: i32[num_steps, num_slots] (rows of slots not in
      `plan.decode_slots` are garbage). logprobs, when any request asked: chosen-token logprob
      f32 and top-n (ids i32, logprobs f32) with the same leading shapes, else None.
    """

    prefill_tokens: np.ndarray
    decode_tokens: np.ndarray
    prefill_logprobs: np.ndarray | None = None  # f32[P]
    prefill_top_ids: np.ndarray | None = None  # i32[P, n]
    prefill_top_logprobs: np.ndarray | None = None  # f32[P, n]
    decode_logprobs: np.ndarray | None = None  # f32[k, S]
    decode_top_ids: np.ndarray | None = None  # i32[k, S, n]
    decode_top_logprobs: np.ndarray | None = None  # f32[k, S, n]
    # Verify steps: i32[C, K+1] tokens, of which the first i32[C] counts are emitted (accepted
    # drafts, then the model's own); logprobs with the same leading [C, K+1]. Chunk c is the
    # plan's verify_slots[c] (C may be larger: padding).
    verify_tokens: np.ndarray | None = None
    verify_counts: np.ndarray | None = None
    verify_logprobs: np.ndarray | None = None  # f32[C, K+1]
    verify_top_ids: np.ndarray | None = None  # i32[C, K+1, n]
    verify_top_logprobs: np.ndarray | None = None  # f32[C, K+1, n]
