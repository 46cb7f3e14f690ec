"""Per-request generation parameters: one frozen dataclass, validated on construction.

Plain data (no jax): the scheduler reads the stop conditions, limits and priority, the runtime turns
the sampling fields into per-slot traced arrays, the server maps its proto message onto it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import uuid

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries of one request's logit_bias (OpenAI's limit)
MAX_ABS_LOGIT_BIAS = 100.0
MAX_CACHE_SALT_LEN = 256  # characters of a client's cache_salt (front ends check it)
# A request's whole salt: what the server derives from the API key or the request, plus the
# client's cache_salt.
MAX_SALT_LEN = 1024

# Sampling levels, each a superset of the one before: the on-device stages a step runs for the
# requests in it (the highest level among them). GREEDY: argmax only; DRAW: penalties, logprobs
# and the random draw; FILTER: also the top-k / top-p / min-p filter (a full-vocabulary sort).
# Rows that need less come out of a higher level exactly as from their own.
GREEDY, DRAW, FILTER = 0, 1, 2
SAMPLING_LEVELS = (GREEDY, DRAW, FILTER)


def cache_salt(scope: str, api_key: str | None, given: str) -> str:
    """The prefix-cache salt of one call (`SamplingParams.cache_salt`): "global" shares pages
    among all callers, "key" among callers of the same API key (salted with a digest of it, so
    the key itself never travels further), "request" not at all (a fresh salt per call; the
    choices of one call still share its prompt). The client's `given` salt (vLLM's cache_salt)
    narrows any scope further. Raises ValueError for a salt over MAX_CACHE_SALT_LEN."""
    if len(given) > MAX_CACHE_SALT_LEN:
        raise ValueError(f"cache_salt=<{len(given)} characters>: at most {MAX_CACHE_SALT_LEN}")
    if scope == "key" and api_key:
        base = "key:" + hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:32]
    elif scope == "request":
        base = "request:" + uuid.uuid4().hex
    else:
        base = ""
    return f"{base}|salt:{given}" if given else base


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # in (0, 1]; 1 = off
    min_p: float = 0.0  # in [0, 1); 0 = off
    repetition_penalty: float = 1.0  # > 0; 1 = off (divides positive logits of seen tokens)
    presence_penalty: float = 0.0  # in [-2, 2]
    frequency_penalty: float = 0.0  # in [-2, 2]
    seed: int | None = None  # None: the engine picks one
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's own stop ids
    stop: tuple[str, ...] = ()  # stop strings, matched on text, never streamed past
    ignore_eos: bool = False  # keep going past the model's stop ids (until max_tokens)
    logprobs: int | None = None  # None: off; n >= 0: chosen token's logprob + top-n alternatives
    priority: int = 0  # admission order among waiting requests: lower first, ties first come
    # (token id, bias) pairs added to those tokens' logits before sampling, as OpenAI's
    # logit_bias; a per-slot traced array on device (changing it never recompiles).
    logit_bias: tuple[tuple[int, float], ...] = ()
    speculative: bool = True  # may use speculative decoding when the engine runs it
    # Prefix-cache isolation: the request shares cached KV pages only with requests of the same
    # salt ("" with every unsalted one). Set by the server from --prefix-cache-scope (the API
    # key, or the request) and the client's cache_salt.
    cache_salt: str = ""

    def __post_init__(self):
        def bad(field, value, rule):
            raise ValueError(f"{field}={value!r}: {rule}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", self.max_tokens, "must be an integer >= 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", self.temperature, "must be a finite number >= 0")
        if self.top_k < 0:
            bad("top_k", self.top_k, "must be >= 0 (0 disables it)")
        if not (0.0 < self.top_p <= 1.0):
            bad("top_p", self.top_p, "must be in (0, 1]")
        if not (0.0 <= self.min_p < 1.0):
            bad("min_p", self.min_p, "must be in [0, 1)")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", self.repetition_penalty, "must be a finite number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (-2.0 <= value <= 2.0):
                bad(name, value, "must be in [-2, 2]")
        if self.seed is not None and not (0 <= self.seed < 2**32):
            bad("seed", self.seed, "must be in [0, 2**32)")
        if any((not isinstance(t, int)) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", self.stop_token_ids, "must be non-negative token ids")
        if len(self.stop) > MAX_STOP_STRINGS:
            bad("stop", f"<{len(self.stop)} strings>", f"at most {MAX_STOP_STRINGS} stop strings")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_STRING_LEN:
                bad("stop", s, f"each stop string must have 1..{MAX_STOP_STRING_LEN} characters")
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", self.logprobs, f"must be in [0, {MAX_LOGPROBS}]")
        if not isinstance(self.priority, int) or not (-2**31 <= self.priority < 2**31):
            bad("priority", self.priority, "must be an integer in [-2**31, 2**31)")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            bad("logit_bias", f"<{len(self.logit_bias)} entries>", f"at most {MAX_LOGIT_BIAS} entries")
        if not isinstance(self.cache_salt, str):
            bad("cache_salt", self.cache_salt, "must be a string")
        if len(self.cache_salt) > MAX_SALT_LEN:
            bad("cache_salt", f"<{len(self.cache_salt)} characters>",
                f"at most {MAX_SALT_LEN} characters")
        seen = set()
        for token, bias in self.logit_bias:
            if not isinstance(token, int) or token < 0 or token in seen:
                bad("logit_bias", token, "token ids must be distinct non-negative integers")
            seen.add(token)
            if not (math.isfinite(bias) and -MAX_ABS_LOGIT_BIAS <= bias <= MAX_ABS_LOGIT_BIAS):
                bad(f"logit_bias[{token}]", bias, f"must be in [-{MAX_ABS_LOGIT_BIAS:g}, "
                                                  f"{MAX_ABS_LOGIT_BIAS:g}]")

    def stop_ids(self, model_stop_ids) -> frozenset[int]:
        """Token ids that end this request: its own, plus the model's unless `ignore_eos`."""
        own = frozenset(self.stop_token_ids)
        return own if self.ignore_eos else own | frozenset(model_stop_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        """Whether repetition / presence / frequency penalties apply (they depend on every
        earlier output token, so such requests decode one token at a time, unspeculated)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def sampling_level(self) -> int:
        """The lowest of SAMPLING_LEVELS that serves this request."""
        if not self.greedy and (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0):
            return FILTER
        penalised = (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                     or self.frequency_penalty != 0.0 or bool(self.logit_bias))
        return DRAW if (not self.greedy or penalised or self.logprobs is not None) else GREEDY
