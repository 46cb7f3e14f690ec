"""Capacity arithmetic for one device of a target: what the serving state and the compiled
programs take of its HBM, the largest page pool and slot count that fit, and a roofline of each
step from the bytes it must read and the FLOPs it must do against the chip's published figures.

Plain arithmetic over numbers `programs` measured; no jax. The byte model (`step_roofline`) is
the DESIGN one: a decode step reads every weight but the embedding table once, plus the live KV
of every slot; a prefill chunk reads the weights once and writes and reads its own K/V.
"""

from __future__ import annotations

import dataclasses

from jaxgen.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device."""
    capacity: int  # what the compiler lets one device's programs use
    weights: int
    kv_pool: int
    decode_state: int
    temporaries: int  # the largest of the programs' temporaries (one program runs at a time)
    temporaries_of: str  # which program that is
    executables: int  # generated code of every program (all stay loaded)
    num_pages: int
    page_bytes: int  # one page of every layer
    state_bytes_per_slot: int
    pages_per_seq: int

    @property
    def used(self) -> int:
        return (self.weights + self.kv_pool + self.decode_state + self.temporaries
                + self.executables)

    @property
    def headroom(self) -> int:
        return self.capacity - self.used

    @property
    def fits(self) -> bool:
        return self.headroom >= 0

    @property
    def max_pages(self) -> int:
        """The largest pool (null page included) that fits beside everything else."""
        free = self.capacity - (self.used - self.kv_pool)
        return max(0, free // self.page_bytes)

    @property
    def max_slots(self) -> int:
        """Slots that fit with every one at max_model_len: its pages plus its decode state,
        with the temporaries measured at the compiled slot count."""
        free = self.capacity - (self.used - self.kv_pool - self.decode_state) - self.page_bytes
        return max(0, free // (self.pages_per_seq * self.page_bytes + self.state_bytes_per_slot))


@dataclasses.dataclass(frozen=True)
class Roofline:
    bytes: float
    flops: float
    seconds: float
    bound: str  # "memory" or "compute"


def _kv_heads_per_device(cfg: ModelConfig, model_axis: int) -> int:
    split = model_axis > 1 and cfg.num_kv_heads % model_axis == 0
    return cfg.num_kv_heads // model_axis if split else cfg.num_kv_heads


def _keys(cfg: ModelConfig, layer: int, context: int) -> int:
    window = cfg.sliding_window if cfg.is_sliding(layer) else None
    return context if window is None else min(context, window)


def step_roofline(cfg: ModelConfig, *, kind: str, tokens: int, context: int, model_axis: int,
                  weight_bytes: int, embed_bytes: int, matmul_params: int, itemsize: int,
                  hbm_bytes_per_s: float, flops_per_s: float) -> Roofline:
    """One device's lower bound for a step. decode: `tokens` slots, each one new token at
    `context` (keys within a sliding window are capped by it); prefill: one `tokens`-token
    prompt from position 0. `weight_bytes` / `embed_bytes` / `matmul_params` are per device;
    untied models read only `tokens` rows of the embedding table, tied ones all of it (logits)."""
    hkv = _kv_heads_per_device(cfg, model_axis)
    hq = hkv * (cfg.num_heads // cfg.num_kv_heads)  # q heads follow their kv heads
    row = 2 * hkv * cfg.head_dim * itemsize  # one token's K and V in one layer
    read = weight_bytes - (0 if cfg.tie_embeddings else embed_bytes)
    if kind == "decode":
        keys = sum(_keys(cfg, layer, context) for layer in range(cfg.num_layers))
        kv = tokens * keys * row + tokens * cfg.num_layers * row  # read the context, write one
        attention = 4 * cfg.head_dim * hq * tokens * keys
    else:  # token t of the prompt attends to min(t + 1, window) keys; K/V written then read
        keys = sum(sum(_keys(cfg, layer, t + 1) for t in range(tokens))
                   for layer in range(cfg.num_layers))
        kv = 2 * tokens * cfg.num_layers * row
        attention = 4 * cfg.head_dim * hq * keys
    total_bytes = read + kv
    flops = 2 * tokens * matmul_params + attention
    memory_s, compute_s = total_bytes / hbm_bytes_per_s, flops / flops_per_s
    return Roofline(total_bytes, flops, max(memory_s, compute_s),
                    "memory" if memory_s >= compute_s else "compute")
