"""`ModelRunner`: executes a `StepPlan` on device and returns a `StepOutput` of host arrays.

Owns the params, the page pools and the decode state; packs a plan's prompt chunks into a
bucketed token array (few shapes, so steady serving never recompiles), calls the jitted
`insert` / `prefill` / `generate` functions with the pools and state donated, and counts any
compilation that happens after warm-up. Each call runs at the sampling level its slots need (a
host-side record per slot, set when a request is placed), so greedy steps do no sampling work
beyond an argmax. Knows nothing about requests, queues or text.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.config import EngineConfig
from jaxgen.models import Model
from jaxgen.runtime.sampling import SamplingRows
from jaxgen.runtime.state import DecodeState, state_shardings
from jaxgen.runtime.steps import make_generate, make_insert, make_prefill, make_verify
from jaxgen.sampling_params import GREEDY, MAX_LOGIT_BIAS, SAMPLING_LEVELS
from jaxgen.scheduler.plan import StepOutput, StepPlan

log = logging.getLogger(__name__)

# Pages when the device cannot report free memory and no share of it was asked for (CPU):
# 16k tokens at page size 16.
DEFAULT_CPU_PAGES = 1024
DEFAULT_MEMORY_UTILIZATION = 0.5  # share of free accelerator memory for the pool


def size_page_pool(model: Model, cfg: EngineConfig, dtype) -> int:
    """`cfg.num_pages`, else the pages that fit in `cfg.memory_utilization` of the free memory
    (all layers): the device's, or on CPU the host's available memory (only when a share was
    asked for: DEFAULT_CPU_PAGES otherwise)."""
    if cfg.num_pages is not None:
        return cfg.num_pages
    stats = jax.local_devices()[0].memory_stats() or {}
    share = cfg.memory_utilization
    if "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        share = DEFAULT_MEMORY_UTILIZATION if share is None else share
    elif share is None or (free := host_available_bytes()) is None:
        return DEFAULT_CPU_PAGES
    c = model.config
    per_page = c.num_layers * cfg.page_size * 2 * c.num_kv_heads * c.head_dim * jnp.dtype(dtype).itemsize
    return max(2, int(free * share) // per_page)


def host_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _settled(call):
    """`call`, returning only once its outputs are computed."""
    def settled(*args, **kwargs):
        return jax.block_until_ready(call(*args, **kwargs))
    return settled


def _as_is(call):
    return call


@dataclasses.dataclass(frozen=True)
class _StepFunctions:
    """A runner's step calls (each waited for when the runner dispatches synchronously) and
    the jitted functions behind them (whose cache sizes count compilations)."""

    prefill: object
    generate: object
    insert: object
    verify: object  # None without speculative decoding
    jitted: tuple


# The jitted step functions of the last few runners, by everything their programs depend on. A
# runner built again with the same model object and settings (an engine restarted in its
# process, a test's next engine of one model) calls the functions whose programs are compiled
# already, instead of tracing and lowering each anew and reading it back from the persistent
# cache. Runners sharing them see each other's compilations in `_compiled()`; they compile the
# same programs for the same shapes, so after both warm-ups neither adds any.
_STEP_FUNCTIONS: collections.OrderedDict = collections.OrderedDict()
_STEP_FUNCTIONS_KEPT = 8
_step_functions_lock = threading.Lock()


def _step_functions(model: Model, cfg: EngineConfig, num_pages: int, mesh, placement,
                    sync_dispatch: bool) -> _StepFunctions:
    """The step functions of a runner of `model` with `cfg` and `num_pages` over `mesh`
    (`placement` follows from those), made once and kept while recently used."""
    key = (model, cfg, num_pages, mesh, sync_dispatch)
    with _step_functions_lock:
        if key in _STEP_FUNCTIONS:
            _STEP_FUNCTIONS.move_to_end(key)
            return _STEP_FUNCTIONS[key]
        settled = _settled if sync_dispatch else _as_is
        prefill = make_prefill(model, settled, placement)
        generate = make_generate(model, cfg.decode_steps, placement)
        insert_state = make_insert(placement)
        verify = make_verify(model, cfg.num_drafts, placement) if cfg.num_drafts else None
        fns = _StepFunctions(
            prefill, settled(generate), settled(insert_state),
            settled(verify) if verify is not None else None,
            (*prefill.jitted, generate, insert_state) + ((verify,) if verify is not None else ()))
        _STEP_FUNCTIONS[key] = fns
        while len(_STEP_FUNCTIONS) > _STEP_FUNCTIONS_KEPT:
            _STEP_FUNCTIONS.popitem(last=False)
        return fns


def _local_copy(tree):
    """Each array as this process can read it: itself when all its shards are here, else (an
    array over the devices of several processes) its replica on a local device. Sampled tokens
    are replicated, so process 0 reads them without any other process taking part."""
    def local(a):
        if a.is_fully_addressable:
            return a
        if not a.is_fully_replicated:
            raise ValueError(f"a step output of shape {a.shape} is split over processes "
                             f"({a.sharding}); process 0 can read only replicated outputs")
        return a.addressable_data(0)
    return jax.tree.map(local, tree)


@dataclasses.dataclass(frozen=True)
class LaunchedStep:
    """A plan whose device work is dispatched; its sampled tokens are still on device."""

    plan: StepPlan
    prefill: object  # Sampled pytree of the prefill call, or None
    decode: object  # Sampled pytree of the generate call, or None
    verify: object = None  # Verified pytree of the verify call (speculative decoding), or None

    def done(self) -> bool:
        """Whether the device has finished this step (its outputs are ready); never blocks."""
        return all(leaf.is_ready() for leaf in jax.tree.leaves((self.prefill, self.decode,
                                                                 self.verify)))


class ModelRunner:
    def __init__(self, model: Model, params, cfg: EngineConfig, mesh=None, *,
                 sync_dispatch: bool = False, reads_tokens: bool = True):
        """`cfg`: the engine's config with max_model_len resolved (`EngineConfig.resolved`).

        Several processes (jaxgen.distributed) each run a runner over one global `mesh`, on the
        same plans in the same order. `reads_tokens`: False on every process but 0, which alone
        copies sampled tokens to host. `sync_dispatch`: wait for each device call before the
        next (CPU processes joined by gloo: with two calls in flight, one local device can enter
        the next call's collective while another is still in the last one's, and the processes
        deadlock)."""
        cfg = cfg.resolved(model.config.max_position_embeddings)
        self.model, self.cfg, self._mesh = model, cfg, mesh
        self.reads_tokens = reads_tokens
        self.num_pages = size_page_pool(model, cfg, model.config.dtype)
        # Params, pools and state are placed explicitly (committed), like the jit outputs they
        # mix with: jit keys its cache on placement too. A step's small inputs go as numpy
        # arrays on one device (`_args`), always, so their signature never changes either.
        self._placement = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
                           if mesh is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        kv_pages = model.init_kv_pages(self.num_pages, cfg.page_size, mesh=mesh)
        self.params, self.kv_pages = (params, kv_pages) if mesh is not None else \
            self._put((params, kv_pages))
        state = DecodeState.create(cfg.num_slots, cfg.pages_per_seq, model.config.vocab_size)
        # Over a mesh the pools and the state keep one placement across every step.
        placement = None
        if mesh is not None:
            placement = (kv_pages[0].sharding, state_shardings(state, mesh))
            self.state = jax.device_put(state, placement[1])
        else:
            self.state = self._put(state)
        self._page_table = np.zeros((cfg.num_slots, cfg.pages_per_seq), np.int32)
        self._slot_levels = np.full(cfg.num_slots, GREEDY, np.int32)  # of the request placed there
        fns = _step_functions(model, cfg, self.num_pages, mesh, placement, sync_dispatch)
        self._prefill, self._generate, self._insert = fns.prefill, fns.generate, fns.insert
        self._verify, self._jitted = fns.verify, fns.jitted
        self._baseline_compiles: int | None = None
        self.compilations_after_warmup = 0
        self.slowest_warmup_s: float | None = None  # set by warmup()

    def _args(self, *arrays):
        """A step's small host inputs (positions, masks, prompt chunks, sampling rows). On one
        device they go to the jitted call as numpy arrays: jit's C++ dispatch uploads them,
        where `device_put` costs ~0.1-0.2 ms of Python per call; they are numpy there always,
        warm-up included, so the compiled signatures match. Over a mesh they are placed
        (replicated) first, as every other input is."""
        return arrays if self._mesh is None else self._put(arrays)

    def _put(self, tree):
        """Commits host arrays to the device. The arrays must not be written afterwards: on CPU
        device_put may alias (not copy) an aligned numpy buffer, and the call it feeds may not
        have run yet."""
        return jax.device_put(tree, self._placement)

    # -- compilation accounting ---------------------------------------------------------------

    def _compiled(self) -> int:
        return sum(f._cache_size() for f in self._jitted)

    def warmup(self) -> float | None:
        """Compiles `insert`, every prefill bucket, and prefill's sampling, `generate` and every
        verify bucket at every sampling level, with no-op inputs. Each call is waited for:
        `slowest_warmup_s` (the longest, compilation or cache load included) sizes the default
        step watchdog. With speculative decoding, then measures a verify step and returns its
        cost (`verify_cost`; None without). Every process of a group runs this same sequence of
        device calls (each is a collective over all of them)."""
        with self._on_mesh():
            self._warmup()
        return self.verify_cost() if self.num_drafts else None

    def _warmup(self) -> None:
        s = self.cfg.num_slots
        slowest = 0.0

        def timed(call):
            nonlocal slowest
            start = time.perf_counter()
            result = call()
            jax.block_until_ready(result)
            slowest = max(slowest, time.perf_counter() - start)
            return result

        rows = jax.tree.map(np.asarray, SamplingRows.zeros(s))  # host arrays, as _assign's
        self.state = timed(lambda: self._insert(self.state, *self._args(
            np.full(s, s, np.int32), rows, np.zeros(s, np.int32))))
        buckets = self.cfg.prefill_buckets
        for level in SAMPLING_LEVELS:
            # A prefill is two programs (make_prefill): the forward, one per bucket whatever the
            # level, and the sampling, one per level whatever the bucket. Every bucket at one
            # level and every level at the smallest bucket compile them all, without running
            # the largest forwards once per level (most of a warm-up from the compile cache).
            for t in buckets if level == SAMPLING_LEVELS[0] else buckets[:1]:
                timed(lambda: self._run_prefill(
                    np.zeros(t, np.int32), np.zeros(t, np.int32), np.full(t, s, np.int32),
                    np.full(s, s, np.int32), np.zeros(s + 1, np.int32), 0, np.zeros(s, bool),
                    level))
            out, self.kv_pages, self.state = timed(lambda: self._generate(
                self.params, self.kv_pages, self.state,
                *self._args(np.zeros(s, np.int32), np.zeros(s, bool)), level=level))
            for c in self.verify_buckets:
                _, self.kv_pages, self.state = timed(lambda: self._verify(
                    self.params, self.kv_pages, self.state, *self._verify_args(c, ()),
                    level=level))
        self.slowest_warmup_s = slowest
        self._baseline_compiles = self._compiled()

    def _check_compiles(self) -> None:
        if self._baseline_compiles is None:
            return
        now = self._compiled()
        if now > self._baseline_compiles:
            self.compilations_after_warmup += now - self._baseline_compiles
            log.warning("compiled %d new program(s) after warm-up (shape outside the buckets?)",
                        now - self._baseline_compiles)
            self._baseline_compiles = now

    def device_lost(self) -> bool:
        """After a failed step: True when nothing can run any more. The failed call consumed
        the donated page pools or decode state; or they hold its error (a step that failed on
        the device poisons its outputs, and a sticky CUDA error such as
        `CUDA_ERROR_LAUNCH_FAILED` fails every later call too); or the device cannot run a
        trivial computation. False when the failure left both intact (e.g. raised on host)."""
        leaves = jax.tree.leaves((self.kv_pages, self.state))
        if any(a.is_deleted() for a in leaves):
            return True
        try:
            jax.block_until_ready(leaves)
            self._probe_device()
        except Exception:  # whatever the runtime raises: this device is not usable
            log.exception("the device failed a health probe after a failed step")
            return True
        return False

    def _probe_device(self) -> None:
        devices = jax.tree.leaves(self.state)[0].sharding.device_set
        local = [d for d in devices if d.process_index == jax.process_index()]
        for d in sorted(local, key=lambda d: d.id):
            jax.block_until_ready(jax.device_put(np.int32(1), d) + 1)

    # -- one step -------------------------------------------------------------------------------

    def execute(self, plan: StepPlan) -> StepOutput:
        """Runs `plan` and returns its tokens on host (launch + collect)."""
        return self.collect(self.launch(plan))

    def _on_mesh(self):
        """The mesh as the context of every jitted call (a no-op without one): the Pallas
        attention kernels run per device under it, since XLA cannot partition a Mosaic or
        Triton call by itself."""
        return jax.set_mesh(self._mesh) if self._mesh is not None else contextlib.nullcontext()

    def launch(self, plan: StepPlan) -> "LaunchedStep":
        """Dispatches `plan`'s device work and returns at once. Plans run on device in launch
        order, so a later plan may be launched before an earlier one is collected."""
        with self._on_mesh():
            return self._launch(plan)

    def _launch(self, plan: StepPlan) -> "LaunchedStep":
        self._update_page_table(plan.page_table_updates)
        if plan.assignments:
            self._assign(plan)
        prefill = self._prefill_chunks(plan) if plan.prefills else None
        decode = self._decode(plan) if plan.decode_slots else None
        verify = self._run_verify(plan) if plan.verify_slots else None
        if self.reads_tokens:
            prefill, decode, verify = _local_copy((prefill, decode, verify))
            # Start the device-to-host copy now: it runs as soon as the step's results exist,
            # while the host does other work, instead of when the host asks.
            for leaf in jax.tree.leaves((prefill, decode, verify)):
                leaf.copy_to_host_async()
        self._check_compiles()
        return LaunchedStep(plan, prefill, decode, verify)

    def collect(self, launched: "LaunchedStep") -> StepOutput:
        """Waits for a launched step's tokens (one transfer) and returns them on host."""
        return self._to_host(launched.plan, launched.prefill, launched.decode, launched.verify)

    def _update_page_table(self, updates) -> None:
        if not updates:
            return
        for slot, pages in updates.items():
            if len(pages) > self.cfg.pages_per_seq:
                raise ValueError(f"slot {slot}: {len(pages)} pages > pages_per_seq={self.cfg.pages_per_seq}")
            self._page_table[slot] = 0
            self._page_table[slot, :len(pages)] = pages
        # A copy: on CPU, device_put of an aligned numpy array is zero-copy, so the device table
        # of a step still in flight (launched ahead) would change under it with the next update
        # and its K/V writes land in another request's pages.
        # Placed as the table it replaces, so the next step's signature is warm-up's.
        self.state = dataclasses.replace(self.state, page_table=jax.device_put(
            self._page_table.copy(), self.state.page_table.sharding))

    def _assign(self, plan: StepPlan) -> None:
        s = self.cfg.num_slots
        slots = np.full(s, s, np.int32)
        cols = {f.name: np.zeros(s, np.float32) for f in dataclasses.fields(SamplingRows)}
        cols["top_k"] = np.zeros(s, np.int32)
        cols["seed"] = np.zeros(s, np.uint32)
        cols["bias_ids"] = np.zeros((s, MAX_LOGIT_BIAS), np.int32)
        cols["bias_values"] = np.zeros((s, MAX_LOGIT_BIAS), np.float32)
        prompt_len = np.zeros(s, np.int32)
        for i, a in enumerate(plan.assignments):
            p = a.params
            slots[i], prompt_len[i] = a.slot, len(a.prompt_ids)
            self._slot_levels[a.slot] = p.sampling_level
            for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                         "presence_penalty", "frequency_penalty"):
                cols[name][i] = getattr(p, name)
            cols["seed"][i] = a.seed
            if p.logit_bias:
                ids, values = zip(*p.logit_bias)
                cols["bias_ids"][i, :len(ids)] = ids
                cols["bias_values"][i, :len(ids)] = values
        rows = SamplingRows(**cols)
        self.state = self._insert(self.state, *self._args(slots, rows, prompt_len))

    def _prefill_chunks(self, plan: StepPlan):
        s = self.cfg.num_slots
        total = plan.num_prefill_tokens
        bucket = next((b for b in self.cfg.prefill_buckets if b >= total), None)
        if bucket is None:
            raise ValueError(f"plan has {total} prefill tokens > max_prefill_tokens="
                             f"{self.cfg.max_prefill_tokens}")
        tokens = np.zeros(bucket, np.int32)
        positions = np.zeros(bucket, np.int32)
        row_slots = np.full(bucket, s, np.int32)
        chunk_slots = np.zeros(s, np.int32)
        cu = np.full(s + 1, total, np.int32)
        sample_mask = np.zeros(s, bool)
        offset = 0
        for c, chunk in enumerate(plan.prefills):
            n = len(chunk.token_ids)
            tokens[offset:offset + n] = chunk.token_ids
            positions[offset:offset + n] = np.arange(chunk.start, chunk.start + n)
            row_slots[offset:offset + n] = chunk.slot
            chunk_slots[c], cu[c], sample_mask[c] = chunk.slot, offset, chunk.sample
            offset += n
        return self._run_prefill(tokens, positions, row_slots, chunk_slots, cu,
                                 len(plan.prefills), sample_mask,
                                 self._level([c.slot for c in plan.prefills]))

    def _run_prefill(self, tokens, positions, row_slots, chunk_slots, cu, num_chunks, sample_mask,
                     level):
        sampled, self.kv_pages, self.state = self._prefill(
            self.params, self.kv_pages, self.state, *self._args(
                tokens, positions, row_slots, chunk_slots, cu,
                np.array([num_chunks], np.int32), sample_mask), level=level)
        return sampled

    def _level(self, slots) -> int:
        """The sampling level that serves every request in `slots`."""
        return int(self._slot_levels[slots].max())

    def _decode(self, plan: StepPlan):
        if plan.num_steps != self.cfg.decode_steps:
            raise ValueError(f"plan.num_steps={plan.num_steps}: this runner decodes "
                             f"{self.cfg.decode_steps} per call")
        positions = np.zeros(self.cfg.num_slots, np.int32)
        active = np.zeros(self.cfg.num_slots, bool)
        positions[list(plan.decode_slots)] = plan.decode_positions
        active[list(plan.decode_slots)] = True
        out, self.kv_pages, self.state = self._generate(
            self.params, self.kv_pages, self.state, *self._args(positions, active),
            level=self._level(list(plan.decode_slots)))
        return out

    def verify_cost(self, reps: int = 3) -> float:
        """A one-request verify call's time in decode tokens of this runner (a `generate` call's
        time over its `decode_steps`), measured on the compiled programs: what one speculating
        request's step costs against decoding one token for the whole batch."""
        per_token, verify = self.step_times(reps=reps)
        return verify / per_token

    def step_times(self, position: int | None = None, reps: int = 3) -> tuple[float, float]:
        """(a decode token's time, a one-request verify call's time) in seconds, the best of
        `reps` calls of the compiled programs. `position` None: every slot idle (what warm-up
        can run: no request holds pages); else slot 0 decodes from `position` and verifies
        `num_drafts` drafts there, its attention reading that much context (the pages of an
        unassigned slot are the null page: the numbers are garbage, the work is real). For
        benchmarks of a runner that serves nothing: slot 0's decode state is left changed."""
        if self._verify is None:
            raise ValueError("step_times: this runner has no speculative decoding "
                             "(EngineConfig.speculative), so no verify step to time")
        if not isinstance(reps, int) or reps < 1:
            raise ValueError(f"reps={reps!r}: must be an integer >= 1")
        limit = self.cfg.max_model_len - self.num_drafts - 1
        if position is not None and not 0 <= position <= limit:
            raise ValueError(f"position={position}: must be within 0..{limit} (max_model_len="
                             f"{self.cfg.max_model_len} less the {self.num_drafts} drafts and "
                             f"the token they follow)")
        s = self.cfg.num_slots
        positions, active, rows = np.zeros(s, np.int32), np.zeros(s, bool), ()
        if position is not None:
            positions[0], active[0] = position, True
            rows = [(0, position, (1,) * self.num_drafts)]

        def best(call):
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                jax.block_until_ready(call())
                times.append(time.perf_counter() - start)
            return min(times)

        def generate():
            out, self.kv_pages, self.state = self._generate(
                self.params, self.kv_pages, self.state, *self._args(positions, active),
                level=GREEDY)
            return out.tokens

        def verify():
            out, self.kv_pages, self.state = self._verify(
                self.params, self.kv_pages, self.state, *self._verify_args(1, rows),
                level=GREEDY)
            return out.tokens

        with self._on_mesh():
            return best(generate) / self.cfg.decode_steps, best(verify)

    @property
    def num_drafts(self) -> int:
        """Speculative decoding: K drafts verified per slot and step (0: off)."""
        return self.cfg.num_drafts

    @property
    def verify_buckets(self) -> tuple[int, ...]:
        """Drafting slots a verify call is padded to: 1, 2, 4, ... and every slot."""
        if not self.num_drafts:
            return ()
        buckets, c = [], 1
        while c < self.cfg.num_slots:
            buckets.append(c)
            c *= 2
        return tuple(buckets) + (self.cfg.num_slots,)

    def _verify_args(self, bucket: int, rows):
        """Host inputs of a verify call of `bucket` chunks: `rows` (slot, position, drafts)."""
        k = self.num_drafts
        slots = np.full(bucket, self.cfg.num_slots, np.int32)
        drafts = np.zeros((bucket, k), np.int32)
        lens = np.zeros(bucket, np.int32)
        positions = np.zeros(bucket, np.int32)
        for c, (slot, position, row) in enumerate(rows):
            if len(row) > k:
                raise ValueError(f"slot {slot}: {len(row)} drafts > num_speculative_tokens={k}")
            slots[c], positions[c], lens[c] = slot, position, len(row)
            drafts[c, :len(row)] = row
        return self._args(slots, drafts, lens, positions)

    def _run_verify(self, plan: StepPlan):
        if self._verify is None:
            raise ValueError(f"plan {plan.step} verifies drafts: this runner has no speculative "
                             f"decoding (EngineConfig.speculative)")
        n = len(plan.verify_slots)
        bucket = next(b for b in self.verify_buckets if b >= n)
        rows = zip(plan.verify_slots, plan.verify_positions, plan.verify_drafts)
        out, self.kv_pages, self.state = self._verify(
            self.params, self.kv_pages, self.state, *self._verify_args(bucket, rows),
            level=self._level(list(plan.verify_slots)))
        return out

    def _to_host(self, plan: StepPlan, prefill, decode, verify=None) -> StepOutput:
        n = len(plan.prefills)
        prefill, decode, verify = jax.device_get((prefill, decode, verify))  # one transfer
        empty_i = np.zeros((0,), np.int32)
        return StepOutput(
            prefill_tokens=prefill.tokens[:n] if prefill is not None else empty_i,
            decode_tokens=decode.tokens if decode is not None else np.zeros((0, 0), np.int32),
            prefill_logprobs=prefill.logprobs[:n] if prefill is not None else None,
            prefill_top_ids=prefill.top_ids[:n] if prefill is not None else None,
            prefill_top_logprobs=prefill.top_logprobs[:n] if prefill is not None else None,
            decode_logprobs=decode.logprobs if decode is not None else None,
            decode_top_ids=decode.top_ids if decode is not None else None,
            decode_top_logprobs=decode.top_logprobs if decode is not None else None,
            verify_tokens=verify.tokens if verify is not None else None,
            verify_counts=verify.counts if verify is not None else None,
            verify_logprobs=verify.logprobs if verify is not None else None,
            verify_top_ids=verify.top_ids if verify is not None else None,
            verify_top_logprobs=verify.top_logprobs if verify is not None else None,
        )
