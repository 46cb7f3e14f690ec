"""`make_plan`: a model, a target and the engine's sizes -> the compiled serving program's HBM
per device, the largest pool and slot count that fit, and each step's estimates.

The order matters for configurations that cannot fit: the serving state is sized from abstract
shapes first, and when weights, pool and decode state alone exceed the device, the programs are
compiled with a one-sequence pool instead (their temporaries do not depend on the pool, which
is donated and aliased) so the report still has every number; XLA's own out-of-memory verdict
stays the authority for configurations that look as if they fit.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math

import jax

from jaxgen.config import EngineConfig
from jaxgen.models import Model
from jaxgen.models.config import ModelConfig
from jaxgen.planning import capacity, programs, targets
from jaxgen.planning.model_shapes import model_config
from jaxgen.sampling_params import FILTER

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    model: str
    target: str
    engine: EngineConfig  # max_model_len None: min(model context, the engine's default)
    mesh: tuple[int, int] | None = None  # None: every device on `model`
    dtype: str | None = "bfloat16"  # None: the model config's
    decode_batches: tuple[int, ...] = ()  # decode batch sizes besides num_slots
    level: int = FILTER  # sampling level compiled (FILTER: the largest program)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    step: programs.CompiledStep
    roofline: capacity.Roofline | None  # prefill and decode steps only

    @property
    def xla_tokens_per_s(self) -> float | None:
        s = self.step.xla_seconds
        return None if not s else self.step.tokens / s

    @property
    def roofline_tokens_per_s(self) -> float | None:
        return None if self.roofline is None else self.step.tokens / self.roofline.seconds


@dataclasses.dataclass(frozen=True)
class Plan:
    config: ModelConfig
    target: targets.Target
    num_devices: int
    num_hosts: int
    mesh: tuple[int, int]
    engine: EngineConfig
    memory: capacity.MemoryPlan
    compiled_pages: int  # the pool the programs were compiled with
    steps: tuple[StepPlan, ...]
    failure: str | None  # one line naming the limit, when the configuration does not fit

    @property
    def compile_seconds(self) -> float:
        return sum(s.step.compile_seconds for s in self.steps)


def make_plan(request: PlanRequest) -> Plan:
    cfg = model_config(request.model, request.dtype)
    target = targets.parse_target(request.target)
    devices = targets.target_devices(target)
    mesh_shape = request.mesh or (1, len(devices))
    mesh = programs.target_mesh(devices, mesh_shape)
    engine = request.engine.resolved(cfg.max_position_embeddings)
    num_pages = engine.num_pages or engine.num_slots * engine.pages_per_seq + 1
    model = Model(cfg, attn_backend="tpu")
    program = programs.ServingProgram(model, mesh, engine, num_pages, request.level)
    weights = programs.device_bytes(program.params)
    pool = programs.device_bytes(program.pages)
    state = programs.device_bytes(program.state(engine.num_slots))
    chip = target.chip
    static = weights + pool + state
    compiled_pages = num_pages
    failure = None
    if static > chip.usable_hbm_bytes:
        failure = (f"does not fit: weights {weights / GIB:.2f} GiB + KV pool {pool / GIB:.2f} GiB "
                   f"({num_pages} pages) + decode state {state / GIB:.2f} GiB = "
                   f"{static / GIB:.2f} GiB per chip > {chip.name} usable HBM "
                   f"{chip.usable_hbm_bytes / GIB:.2f} GiB")
        compiled_pages = engine.pages_per_seq + 1
        if weights + state + compiled_pages * (pool // num_pages) > chip.usable_hbm_bytes:
            return _plan(cfg, target, devices, mesh_shape, engine, program, num_pages, 0, (),
                         failure, weights, pool, state)
        program = programs.ServingProgram(model, mesh, engine, compiled_pages, request.level)
    try:
        compiled = _compile_all(program, engine, request.decode_batches)
    except Exception as e:  # the compiler's verdict (e.g. RESOURCE_EXHAUSTED), in one line
        line = str(e).strip().splitlines()[0]
        return _plan(cfg, target, devices, mesh_shape, engine, program, num_pages, compiled_pages,
                     (), failure or f"does not compile: {line}", weights, pool, state)
    return _plan(cfg, target, devices, mesh_shape, engine, program, num_pages, compiled_pages,
                 compiled, failure, weights, pool, state)


def _compile_all(program: programs.ServingProgram, engine: EngineConfig, batches):
    jobs = [program.compile_insert, program.compile_sample]
    jobs += [functools.partial(program.compile_prefill, t) for t in engine.prefill_buckets]
    jobs += [functools.partial(program.compile_decode, b)
             for b in sorted(set(batches) | {engine.num_slots})]
    # Two at a time: one program is traced and lowered while another compiles (compilations
    # themselves one at a time: programs._COMPILE_LOCK).
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return tuple(pool.map(lambda job: job(), jobs))


def _plan(cfg, target, devices, mesh_shape, engine, program, num_pages, compiled_pages, compiled,
          failure, weights, pool, state) -> Plan:
    serving = [s for s in compiled if s.kind != "decode" or s.tokens == engine.num_slots]
    biggest = max(serving, key=lambda s: s.temp_bytes, default=None)
    chip = target.chip
    memory = capacity.MemoryPlan(
        capacity=chip.usable_hbm_bytes, weights=weights, kv_pool=pool, decode_state=state,
        temporaries=biggest.temp_bytes if biggest else 0,
        temporaries_of=biggest.name if biggest else "-",
        executables=sum(s.code_bytes for s in serving), num_pages=num_pages,
        page_bytes=pool // num_pages, state_bytes_per_slot=state // engine.num_slots,
        pages_per_seq=engine.pages_per_seq)
    if failure is None and compiled and not memory.fits:
        failure = (f"does not fit: {memory.used / GIB:.2f} GiB per chip needed (weights, pool, "
                   f"state, temporaries of {memory.temporaries_of}, executables) > {chip.name} "
                   f"usable HBM {chip.usable_hbm_bytes / GIB:.2f} GiB")
    embed = program.params["embed"]
    matmul_params = sum(_shard_size(a) for a in jax.tree.leaves(program.params))
    if not cfg.tie_embeddings:  # a lookup, not a matmul
        matmul_params -= _shard_size(embed)

    def roofline(s):
        if s.kind not in ("prefill", "decode"):
            return None
        return capacity.step_roofline(
            cfg, kind=s.kind, tokens=s.tokens, context=engine.max_model_len,
            model_axis=mesh_shape[1], weight_bytes=weights,
            embed_bytes=programs.device_bytes(embed), matmul_params=matmul_params,
            itemsize=program.pages[0].dtype.itemsize,
            hbm_bytes_per_s=chip.device_hbm_bytes_per_s, flops_per_s=chip.device_flops_per_s)

    return Plan(cfg, target, len(devices), targets.num_hosts(devices), mesh_shape, engine, memory,
                compiled_pages, tuple(StepPlan(s, roofline(s)) for s in compiled), failure)


def _shard_size(a) -> int:
    return math.prod(a.sharding.shard_shape(a.shape))
