"""Reading sampled tokens (and their logprobs) out of a `StepOutput`, per chunk or decode slot.

Knows the layout of the host arrays in `StepOutput`; does not know requests or stop rules.
"""

from __future__ import annotations

from typing import NamedTuple

from jaxgen.scheduler.plan import StepOutput, StepPlan


class TokenLogprobs(NamedTuple):
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob) alternatives, as many as asked


class StepSamples:
    """Host view of one step's output. Token arrays become Python lists once per step, so the
    per-token path does no numpy scalar work; logprobs are read only for requests that asked.

    A source is ("prefill", chunk index), ("decode", slot) or ("verify", slot)."""

    def __init__(self, plan: StepPlan, output: StepOutput):
        self._output = output
        if len(output.prefill_tokens) < len(plan.prefills):
            raise ValueError(f"prefill_tokens has {len(output.prefill_tokens)} entries for "
                             f"{len(plan.prefills)} prefill chunks")
        self._tokens = {"prefill": [[t] for t in output.prefill_tokens.tolist()], "decode": []}
        if plan.decode_slots:
            shape = output.decode_tokens.shape
            if len(shape) != 2 or shape[0] < plan.num_steps or shape[1] <= max(plan.decode_slots):
                raise ValueError(f"decode_tokens shape {shape}: need at least "
                                 f"[{plan.num_steps}, {max(plan.decode_slots) + 1}]")
            self._tokens["decode"] = output.decode_tokens[:plan.num_steps].T.tolist()
        if plan.verify_slots:  # chunk c of the verify call is plan.verify_slots[c]
            counts = output.verify_counts.tolist()
            rows = output.verify_tokens.tolist()
            self._tokens["verify"] = {s: rows[c][:counts[c]] for c, s in enumerate(plan.verify_slots)}
            self._verify_chunk = {s: c for c, s in enumerate(plan.verify_slots)}
    def tokens(self, kind: str, index: int) -> list[int]:
        """The token sampled after a prefill chunk, or the column a decode slot produced."""
        return self._tokens[kind][index]

    def logprobs(self, kind: str, index: int, count: int,
                 num_top: int | None) -> tuple[TokenLogprobs, ...] | None:
        """Logprobs of the first `count` tokens of a source; None when not asked for
        (`num_top` = params.logprobs is None) or not returned by the runtime."""
        out = self._output
        logprobs = getattr(out, f"{kind}_logprobs")
        if num_top is None or logprobs is None:
            return None
        top_ids = getattr(out, f"{kind}_top_ids")
        top_logprobs = getattr(out, f"{kind}_top_logprobs")
        if kind == "prefill":
            rows = [(index,)]
        elif kind == "decode":
            rows = [(t, index) for t in range(count)]
        else:
            rows = [(self._verify_chunk[index], t) for t in range(count)]
        result = []
        for row, token in zip(rows, self.tokens(kind, index)):
            top = ()
            if num_top and top_ids is not None and top_logprobs is not None:
                top = tuple(zip(top_ids[row][:num_top].tolist(),
                                top_logprobs[row][:num_top].tolist()))
            result.append(TokenLogprobs(token, float(logprobs[row]), top))
        return tuple(result)
