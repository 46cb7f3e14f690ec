"""Joining a group of processes with `jax.distributed`, and what the processes must agree on
before any of them serves.

`join(config)` resolves who this process is (the flags, or JAX's own detection of a TPU pod or
cluster with `--distributed auto`), turns on gloo for CPU collectives, initializes
`jax.distributed` with timeouts derived from `--peer-timeout`, and checks that every process runs
the same thing: jaxgen and JAX versions, the process count, the platform, and the deployment
config as given (the engine and the mesh; not the paths, ports or keys, which may differ per
host). A mismatch is the same `GroupError` on every process, raised before any model is loaded.
Later agreements (the model's config and weights) use `agree` too: every process publishes its
facts in the coordination service's key-value store and reads everyone's.

Knows jax.distributed and the config; nothing of models, plans or sockets.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time

import jax

from jaxgen.config import Config, ConfigError, DistributedConfig, GroupError
from jaxgen.version import version

log = logging.getLogger(__name__)

START_TIMEOUT_FACTOR = 10  # start-up waits (joining, agreeing, loading peers) per peer timeout
LEAVE_GRACE_S = 1.0  # process 0 outlives the others' exit on a failed agreement by this much


def resolve(dist: DistributedConfig) -> DistributedConfig:
    """`dist` with coordinator_address, num_processes and process_id all set: as given, the
    rest (with mode "auto") from the cluster environment JAX detects, by the same detection
    `jax.distributed.initialize` runs."""
    if dist.mode == "auto":
        from jax._src.clusters import ClusterEnv  # what jax.distributed.initialize consults

        address, count, rank, _ = ClusterEnv.auto_detect_unset_distributed_params(
            dist.coordinator_address, dist.num_processes, dist.process_id, None, None,
            int(dist.peer_timeout_s * START_TIMEOUT_FACTOR))
        if None in (address, count, rank):
            raise ConfigError("distributed", "auto",
                              "JAX detected no TPU pod or cluster environment (Slurm, Open MPI, "
                              "...): give --coordinator-address, --num-processes and --process-id")
        return dataclasses.replace(dist, mode="manual", coordinator_address=address,
                                   num_processes=count, process_id=rank)
    return dataclasses.replace(dist, num_processes=dist.num_processes or 1,
                               process_id=dist.process_id or 0)


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a joined group, and the key-value store they share."""

    process_id: int
    num_processes: int
    coordinator_address: str
    peer_timeout_s: float
    client: object  # jax.distributed's client (the coordination service's key-value store)

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0

    @property
    def sync_dispatch(self) -> bool:
        """Whether each device call must finish before the next is dispatched (see
        `ModelRunner`): on CPU, where gloo joins the processes' collectives."""
        return jax.default_backend() == "cpu"

    @property
    def start_timeout_s(self) -> float:
        return self.peer_timeout_s * START_TIMEOUT_FACTOR

    @property
    def name(self) -> str:
        return f"process {self.process_id} of {self.num_processes}"

    def publish(self, key: str, value: str) -> None:
        self.client.key_value_set(f"jaxgen/{key}", value)

    def read(self, key: str, who: str = "process 0") -> str:
        """The value `who` published under `key`, waiting up to the start-up timeout."""
        try:
            return self.client.blocking_key_value_get(f"jaxgen/{key}",
                                                      int(self.start_timeout_s * 1000))
        except Exception as e:  # the client raises its own error types for a timeout
            raise GroupError(f"{self.name}: {who} did not publish {key!r} within "
                             f"{self.start_timeout_s:g}s (still loading, or gone?): "
                             f"{type(e).__name__}: {e}") from None

    def agree(self, key: str, facts: dict) -> list[dict]:
        """Publishes this process's `facts` under `key` and returns every process's, by rank;
        raises GroupError naming each fact in which a process differs from process 0. A
        process that differs says so as soon as it has read process 0's facts (the others
        may never come: a different process count); then every process checks all of them.
        Process 0 raises only once the others have their verdict too (or after the peer
        timeout): the coordination service ends with it, and with it their chance to say why."""
        self.publish(f"{key}/{self.process_id}", json.dumps(facts, sort_keys=True))
        try:
            leader = facts if self.is_leader else self._facts(key, 0)
            self._check(key, {self.process_id: facts}, leader)
            everyone = [facts if rank == self.process_id else self._facts(key, rank)
                        for rank in range(self.num_processes)]
            self._check(key, dict(enumerate(everyone)), leader)
        except GroupError:
            self.publish(f"{key}/verdict/{self.process_id}", "differs")
            if self.is_leader:
                self._await_verdicts(key)
                # The others leave on their verdict (os._exit, a few calls away), and must be
                # gone before the coordination service goes with process 0: its agent on a
                # process still there aborts that process (SIGABRT) instead of its exit 2.
                time.sleep(LEAVE_GRACE_S)
            raise
        self.publish(f"{key}/verdict/{self.process_id}", "same")
        return everyone

    def _await_verdicts(self, key: str) -> None:
        deadline = time.monotonic() + self.peer_timeout_s
        for rank in range(1, self.num_processes):
            try:
                self.client.blocking_key_value_get(
                    f"jaxgen/{key}/verdict/{rank}",
                    max(1, int((deadline - time.monotonic()) * 1000)))
            except Exception:  # gone, or still loading: process 0 reports for it
                pass

    def _facts(self, key: str, rank: int) -> dict:
        return json.loads(self.read(f"{key}/{rank}", f"process {rank}"))

    def _check(self, key: str, facts: dict[int, dict], leader: dict) -> None:
        differences = [f"process {rank} has {name}={value!r} where process 0 has "
                       f"{name}={leader.get(name)!r}"
                       for rank, theirs in facts.items()
                       for name, value in sorted(theirs.items()) if value != leader.get(name)]
        if differences:
            raise GroupError(f"the {self.num_processes} processes were not started alike "
                             f"({key}): " + "; ".join(differences) +
                             ". Run the same command, with the same checkpoint, on every process")


def join(config: Config) -> ProcessGroup:
    """Joins this process to its group (`jax.distributed.initialize`) and checks that every
    process was started alike. Must run before anything touches a JAX device."""
    dist = resolve(config.distributed)
    # Only the CPU backend reads it: on CPU, cross-process collectives go through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's preemption service takes SIGTERM for itself (it notes the signal and swallows it);
    # jaxgen's own handling (process 0 drains, then stops the others) must keep it.
    jax.config.update("jax_enable_preemption_service", False)
    start = int(dist.peer_timeout_s * START_TIMEOUT_FACTOR)
    # A group that never forms (a process not started, another --coordinator-address or
    # --num-processes) ends jax.distributed's connect with an abort from C++ (an absl fatal
    # error and SIGABRT), which no `except` sees: this process says why and leaves first.
    # JAX's own timeout is set later than this one, so this one speaks.
    gave_up = threading.Timer(start, _never_formed, args=(dist, start))
    gave_up.daemon = True
    gave_up.start()
    try:
        jax.distributed.initialize(
            dist.coordinator_address, dist.num_processes, dist.process_id,
            initialization_timeout=start + JOIN_MARGIN_S,
            # JAX's own heartbeat is the backstop: jaxgen's (wire.BEAT) notices a lost process
            # first, and stops the group with a message naming it.
            heartbeat_timeout_seconds=int(2 * dist.peer_timeout_s) + 10,
            shutdown_timeout_seconds=int(dist.peer_timeout_s))
    except Exception as e:
        raise GroupError(
            f"process {dist.process_id} of {dist.num_processes} could not join the group at "
            f"{dist.coordinator_address} within {start}s: {type(e).__name__}: {e}. Every process "
            "needs the same --coordinator-address and --num-processes, and process 0 must be "
            "running") from None
    finally:
        gave_up.cancel()
    from jax._src import distributed

    group = ProcessGroup(dist.process_id, dist.num_processes, dist.coordinator_address,
                         dist.peer_timeout_s, distributed.global_state.client)
    group.agree("start", start_facts(config, dist))
    log.info("%s joined (coordinator %s)", group.name, group.coordinator_address)
    return group


JOIN_MARGIN_S = 10  # JAX's join timeout is this much past jaxgen's


def _never_formed(dist: DistributedConfig, start: int) -> None:
    """Runs on a timer thread while the main thread is still inside jax.distributed's connect."""
    if dist.process_id == 0:
        why = (f"the other {dist.num_processes - 1} process(es) did not all reach this "
               f"coordinator at {dist.coordinator_address}")
    else:
        why = (f"not all {dist.num_processes} processes reached the coordinator at "
               f"{dist.coordinator_address}, which process 0 runs")
    print(f"jaxgen: error: process {dist.process_id} of {dist.num_processes}: the group did not "
          f"form within {start}s (--peer-timeout x {START_TIMEOUT_FACTOR}): {why}. Start every "
          "process, each with the same --coordinator-address and --num-processes and its own "
          "--process-id", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)


def start_facts(config: Config, dist: DistributedConfig) -> dict:
    """What must be equal on every process before anything is loaded."""
    facts = {"jaxgen": version(), "jax": jax.__version__, "num_processes": dist.num_processes,
             "peer_timeout": dist.peer_timeout_s, "platform": jax.default_backend(),
             "local_devices": jax.local_device_count(),
             "mesh": list(config.mesh) if config.mesh else None,
             "dtype": config.model.dtype}
    # max_waiting bounds process 0's queue alone (and its engine process raises it).
    facts.update({f"engine.{k}": v for k, v in dataclasses.asdict(config.engine).items()
                  if k != "max_waiting"})
    return facts
