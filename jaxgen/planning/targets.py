"""Compile targets: a TPU chip or pod slice named like `v5e:4x4`, described by libtpu with no TPU
attached, plus the published figures of each chip that rooflines need.

`target_devices` gives compile-only devices (`jax.experimental.topologies`): programs lowered
with shardings on them compile through the whole TPU pipeline (Mosaic included) on a CPU host,
and the result answers `memory_analysis()` and `cost_analysis()`. `compiling_for` is the one
place that tells Pallas which chip it lowers for: on a CPU host it would otherwise ask the
default (CPU) backend. Knows nothing about models or serving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import threading

GIB = 1 << 30


class TargetError(ValueError):
    """A target that cannot be described or compiled for here (the CLI prints it, no traceback)."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One chip generation. Published per-chip figures (Google Cloud TPU system architecture
    pages for v4, v5e, v5p and v6e: "Peak compute per chip (bf16)", "HBM capacity", "HBM
    bandwidth"); `usable_hbm_bytes` is what libtpu's compiler lets one device's program use
    (the limit in its out-of-memory error). `devices_per_chip`: JAX devices libtpu's topology
    makes of one chip (v4: one per TensorCore)."""
    name: str
    device_kind: str
    hbm_bytes: int
    usable_hbm_bytes: int
    hbm_bytes_per_s: float
    bf16_flops_per_s: float
    devices_per_chip: int = 1
    three_d: bool = False  # topology names have three dimensions (v4, v5p)

    @property
    def device_hbm_bytes_per_s(self) -> float:
        return self.hbm_bytes_per_s / self.devices_per_chip

    @property
    def device_flops_per_s(self) -> float:
        return self.bf16_flops_per_s / self.devices_per_chip


CHIPS = {c.name: c for c in (
    Chip("v4", "TPU v4", 32 * GIB, int(15.25 * GIB), 1200e9, 275e12, devices_per_chip=2,
         three_d=True),
    Chip("v5e", "TPU v5 lite", 16 * GIB, int(15.75 * GIB), 819e9, 197e12),
    Chip("v5p", "TPU v5", 95 * GIB, int(95.74 * GIB), 2765e9, 459e12, three_d=True),
    Chip("v6e", "TPU v6 lite", 32 * GIB, int(31.25 * GIB), 1640e9, 918e12),
)}
GPU_NAMES = ("gpu", "cuda", "h100", "h200", "a100", "b200", "l4")
_SHAPE = re.compile(r"^\d+(x\d+){1,2}$")


@dataclasses.dataclass(frozen=True)
class Target:
    """A chip generation and slice shape: `topology` as libtpu names it (`v5e:4x4`)."""
    chip: Chip
    topology: str
    single_chip: bool

    @property
    def name(self) -> str:
        return f"{self.chip.name}-1" if self.single_chip else self.topology


def parse_target(spec: str) -> Target:
    """`v5e:4x4`, `v6e:2x2`, `v5p:2x2x1` (a slice) or `v5e`, `v5e-1`, `v5e:1x1` (one chip)."""
    text = spec.strip().lower()
    if text.split(":")[0].split("-")[0] in GPU_NAMES:
        raise TargetError(_gpu_message(spec))
    chip_name, _, shape = text.partition(":")
    if not shape and chip_name.endswith("-1"):
        chip_name = chip_name[:-2]
    chip = CHIPS.get(chip_name)
    if chip is None:
        raise TargetError(f"target={spec!r}: unknown chip {chip_name!r}; known: "
                          f"{', '.join(sorted(CHIPS))} (e.g. v5e:2x2, v6e-1)")
    ones = "1x1x1" if chip.three_d else "1x1"
    shape = shape or ones
    if not _SHAPE.match(shape) or len(shape.split("x")) != (3 if chip.three_d else 2):
        raise TargetError(f"target={spec!r}: slice shape {shape!r} must be "
                          f"{'AxBxC' if chip.three_d else 'AxB'} for {chip.name}")
    return Target(chip, f"{chip.name}:{shape}", single_chip=shape == ones)


def _gpu_message(spec: str) -> str:
    have_plugin = any(importlib.util.find_spec(m) is not None
                      for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    why = ("its compile-only GPU topologies need a target description this planner does not "
           "build yet" if have_plugin else
           "JAX describes a GPU with no GPU attached only through the CUDA PJRT plugin "
           "(jax[cuda12]), which is not installed here")
    return (f"target={spec!r}: GPU targets cannot be planned here: {why}. Plan on the GPU "
            f"machine itself, or name a TPU target (e.g. v5e:2x2).")


_TOPOLOGY_LOCK = threading.Lock()


def target_devices(target: Target) -> list:
    """Compile-only devices of `target`, in libtpu's order (process by process)."""
    if importlib.util.find_spec("libtpu") is None:
        raise TargetError(f"target={target.name!r}: compiling for a TPU needs libtpu "
                          "(pip install 'libtpu==0.0.42.*'; it is in jaxgen[test])")
    # One thread at a time, imports included: the first description imports JAX's topology
    # module (two threads importing JAX at once can meet a partially initialised module) and
    # loads libtpu's PJRT plugin (two threads loading it at once fail one of them with
    # ALREADY_EXISTS: PJRT_Api already exists, and have left the process to crash in a later
    # compile).
    with _TOPOLOGY_LOCK:
        _share_libtpu()
        from jax.experimental import topologies

        try:
            if target.single_chip:
                return list(topologies.get_topology_desc(
                    target.topology, "tpu", chips_per_host_bounds=(1, 1, 1)).devices)
            return list(topologies.get_topology_desc(target.topology, "tpu").devices)
        except Exception as e:  # libtpu's own verdict (a JaxRuntimeError), in one line
            raise TargetError(f"target={target.name!r}: libtpu cannot describe it here: "
                              f"{str(e).strip().splitlines()[0]}") from None


def _share_libtpu() -> None:
    """On a host with no TPU, let several processes load libtpu at once: compiling opens no
    device, and libtpu's lockfile would otherwise make a second planner (or the test suite)
    fail to start. On a TPU host the lock stays, guarding the chips."""
    from jax._src import hardware_utils

    if hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def num_hosts(devices) -> int:
    return len({d.process_index for d in devices})


@contextlib.contextmanager
def compiling_for(device):
    """Lower and compile for `device`'s chip: Pallas reads the chip generation (tiling, VMEM)
    from the default device, which on a CPU host is the CPU unless set here."""
    import jax

    with jax.default_device(device):
        yield
