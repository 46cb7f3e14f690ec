"""The serving program, compiled ahead of time for a target with no accelerator attached.

Builds the engine's jitted steps exactly as the runner calls them (`jaxgen.runtime.steps`,
`jaxgen.runtime.state.insert`) on abstract inputs: parameters, page pools and decode state as
`ShapeDtypeStruct`s carrying their shardings on the target's mesh (nothing is materialised, so
an 8B model costs no memory), and compiles each program: `insert`, the prefill forward of every
token bucket, the sampling of the chunks' last rows, and `generate` at each decode batch size.
Each `CompiledStep` keeps what the compiler says about it: per-device memory
(`memory_analysis()`), XLA's cost estimate (`cost_analysis()`) and the compile time.

Knows nothing about capacity or chips' published figures (`capacity`), nor about the CLI.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxgen.config import EngineConfig
from jaxgen.models import Model
from jaxgen.models.sharding import kv_pages_sharding, make_mesh
from jaxgen.planning.targets import compiling_for
from jaxgen.runtime.sampling import SamplingRows
from jaxgen.runtime.state import DecodeState, state_shardings
from jaxgen.runtime.steps import make_generate, make_insert, make_prefill

# One TPU compilation at a time: `jaxgen plan` lowers the next program while one compiles, and
# two libtpu compilations at once crashed the process once in the test suite (a segmentation
# fault with both threads inside the compiler, compiling the Llama-3-8B shape for v6e).
_COMPILE_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """One compiled program. Sizes are bytes per device; `tokens`: query tokens per call
    (prefill bucket, or decode slots for one decode step)."""
    name: str
    kind: str  # "insert" | "prefill" | "sample" | "decode"
    tokens: int
    compile_seconds: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float
    bytes_accessed: float
    xla_seconds: float | None  # XLA's optimal_seconds, ops it could not price taken out
    unpriced_ops: int  # how many ops XLA's cost model could not price (each reported as -1 s)

    @classmethod
    def of(cls, name, kind, tokens, compiled, seconds) -> "CompiledStep":
        memory = compiled.memory_analysis()
        cost = compiled.cost_analysis() or {}
        optimal = cost.get("optimal_seconds")
        # XLA's TPU cost model reports an op it cannot price (a scatter, say) as -1 s and adds it
        # in: the whole seconds below zero count those ops, the fraction is the priced rest.
        unpriced = 0 if optimal is None or optimal >= 0 else math.ceil(-optimal)
        return cls(name, kind, tokens, seconds, memory.argument_size_in_bytes,
                   memory.output_size_in_bytes, memory.alias_size_in_bytes,
                   memory.temp_size_in_bytes, memory.generated_code_size_in_bytes,
                   float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)),
                   None if optimal is None else optimal + unpriced, unpriced)


def target_mesh(devices, mesh_shape: tuple[int, int]) -> Mesh:
    """`devices` (libtpu's order, process by process) as a (data, model) mesh, built as the
    runner builds it from `jax.devices()` on the slice (`make_mesh`, every process of a
    group alike); errors name the shape and count."""
    data, model = mesh_shape
    if data * model != len(devices):
        raise ValueError(f"mesh={data},{model}: {data * model} devices, but the target has "
                         f"{len(devices)}")
    return make_mesh(mesh_shape, devices)


def _abstract(tree, sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def abstract_params(model: Model, mesh: Mesh):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        model.abstract_params, model.param_shardings(mesh))


def abstract_pages(model: Model, mesh: Mesh, num_pages: int, page_size: int):
    c = model.config
    sharding = kv_pages_sharding(c.num_kv_heads, mesh)
    page = jax.ShapeDtypeStruct(model.kv_page_shape(num_pages, page_size), jnp.dtype(c.dtype),
                                sharding=sharding)
    return [page] * c.num_layers


def abstract_state(model: Model, mesh: Mesh, slots: int, pages_per_seq: int):
    """The decode state placed as the runner places it over a mesh (`state_shardings`)."""
    state = jax.eval_shape(lambda: DecodeState.create(slots, pages_per_seq,
                                                      model.config.vocab_size))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        state, state_shardings(state, mesh))


def device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded `ShapeDtypeStruct`s (the largest shard)."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
               for a in jax.tree.leaves(tree))


class ServingProgram:
    """The abstract serving state of `model` on `mesh` for `engine` (max_model_len resolved)
    with `num_pages` pages, and the compile of each step at sampling `level`."""

    def __init__(self, model: Model, mesh: Mesh, engine: EngineConfig, num_pages: int,
                 level: int):
        self.model, self.mesh, self.engine, self.level = model, mesh, engine, level
        self.params = abstract_params(model, mesh)
        self.pages = abstract_pages(model, mesh, num_pages, engine.page_size)
        self._replicated = NamedSharding(mesh, P())

    def state(self, slots: int):
        return abstract_state(self.model, self.mesh, slots, self.engine.pages_per_seq)

    def placement(self, slots: int):
        """Where the runner keeps the pools and the state across steps (the steps'
        `placement`): the same out_shardings as served, so the same programs."""
        return self.pages[0].sharding, jax.tree.map(lambda a: a.sharding, self.state(slots))

    def _small(self, shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self._replicated)

    def _compile(self, name, kind, tokens, fn, *args, **static) -> CompiledStep:
        start = time.perf_counter()
        with compiling_for(self.mesh.devices.flat[0]), jax.set_mesh(self.mesh):
            lowered = fn.lower(*args, **static)
            with _COMPILE_LOCK:
                compiled = lowered.compile()
        return CompiledStep.of(name, kind, tokens, compiled, time.perf_counter() - start)

    def compile_insert(self) -> CompiledStep:
        s = self.engine.num_slots
        rows = _abstract(jax.eval_shape(lambda: SamplingRows.zeros(s)), self._replicated)
        step = make_insert(self.placement(s))
        return self._compile("insert", "insert", s, step, self.state(s), self._small((s,)),
                             rows, self._small((s,)))

    def compile_prefill(self, bucket: int) -> CompiledStep:
        forward, _ = make_prefill(self.model, placement=self.placement(
            self.engine.num_slots)).jitted
        return self._compile(f"prefill[{bucket}]", "prefill", bucket, forward,
                             *self._prefill_args(bucket))

    def _prefill_args(self, bucket: int):
        s = self.engine.num_slots
        t = self._small((bucket,))
        return (self.params, self.pages, self.state(s), t, t, t, self._small((s,)),
                self._small((s + 1,)), self._small((1,)))

    def compile_sample(self) -> CompiledStep:
        """The sampling of each chunk's last row after a prefill (one program per level)."""
        s = self.engine.num_slots
        forward, pick = make_prefill(self.model, placement=self.placement(s)).jitted
        logits, positions, _, _ = jax.eval_shape(forward, *self._prefill_args(16))
        return self._compile(
            "sample", "sample", s, pick, self.state(s), _abstract(logits, self._replicated),
            _abstract(positions, self._replicated), self._small((s,)),
            self._small((s,), jnp.bool_), level=self.level)

    def compile_decode(self, slots: int) -> CompiledStep:
        """`generate` for `slots` slots; XLA's cost analysis counts its on-device loop body
        once, so its figures are one decode step (`slots` tokens)."""
        generate = make_generate(self.model, self.engine.decode_steps, self.placement(slots))
        return self._compile(f"decode[{slots}]", "decode", slots, generate, self.params,
                             self.pages, self.state(slots), self._small((slots,)),
                             self._small((slots,), jnp.bool_), level=self.level)
