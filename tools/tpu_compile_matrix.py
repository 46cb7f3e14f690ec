"""What libtpu compiles, with no TPU attached: the TPU attention kernels over the issue's grid
per chip, and the engine's serving program (insert, sampling, a prefill bucket, generate) per
model, slice and mesh. Prints the matrix docs/tpu.md shows.

    python tools/tpu_compile_matrix.py                     # kernels (96-case grid) + serving
    python tools/tpu_compile_matrix.py --grid covering     # the 12-case subset the tests use
    python tools/tpu_compile_matrix.py --no-serving --chips v5e

Serving programs use the tests' small shapes (8 slots x 256 tokens, prefill bucket 16, greedy
sampling) with every layer of the model.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SERVING = (  # model, target, mesh
    ("gemma3-270m", "v5e-1", (1, 1)), ("gemma3-270m", "v6e-1", (1, 1)),
    ("gemma3-270m", "v5e:2x2", (1, 4)), ("gemma3-270m", "v5e:2x2", (2, 2)),
    ("gemma3-270m", "v5e:4x4", (1, 16)), ("gemma3-270m", "v5e:4x4", (4, 4)),
    ("llama-3-8b", "v5e-1", (1, 1)), ("llama-3-8b", "v6e-1", (1, 1)),
    ("llama-3-8b", "v5e:2x2", (1, 4)), ("llama-3-8b", "v5e:2x2", (2, 2)),
    ("llama-3-8b", "v5e:4x4", (1, 16)), ("llama-3-8b", "v5e:4x4", (4, 4)),
)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:160]


def kernel_matrix(chips, grid) -> None:
    from jaxgen.planning import kernels, targets

    cases = kernels.full_grid() if grid == "full" else kernels.covering_grid()
    print(f"kernels ({grid} grid, {len(cases)} cases per chip)")
    for chip in chips:
        device = targets.target_devices(targets.parse_target(f"{chip}-1"))[0]
        start = time.perf_counter()
        ok, errors = collections.Counter(), collections.defaultdict(list)
        for case in cases:
            try:
                kernels.compile_attention(device, case)
                ok[case.dtype] += 1
            except Exception as e:  # the compiler's verdict is the result
                errors[_first_line(e)].append(case.name)
        per_dtype = ", ".join(f"{dt} {ok[dt]}/{sum(c.dtype == dt for c in cases)}"
                              for dt in ("bfloat16", "float32"))
        print(f"  {chip}: {sum(ok.values())}/{len(cases)} compile ({per_dtype}), "
              f"{time.perf_counter() - start:.0f} s")
        for line, names in errors.items():
            print(f"    {len(names)} x {line}  (e.g. {names[0]})")


def serving_matrix() -> None:
    from jaxgen.config import EngineConfig
    from jaxgen.models import Model
    from jaxgen.planning import programs, targets
    from jaxgen.planning.model_shapes import model_config
    from jaxgen.sampling_params import GREEDY

    print("serving program (bf16, TPU kernels, 8 slots x 256 tokens, greedy)")
    print(f"  {'model':12s} {'target':8s} {'mesh':6s} {'hosts':>5s}  insert sample prefill[16] "
          "decode[8]  compile s")
    for name, target_name, mesh_shape in SERVING:
        cfg = model_config(name)
        target = targets.parse_target(target_name)
        devices = targets.target_devices(target)
        mesh = programs.target_mesh(devices, mesh_shape)
        engine = EngineConfig(num_slots=8, max_model_len=256,
                              max_prefill_tokens=16).resolved(cfg.max_position_embeddings)
        program = programs.ServingProgram(Model(cfg, attn_backend="tpu"), mesh, engine,
                                          8 * engine.pages_per_seq + 1, GREEDY)
        cells, seconds, notes = [], 0.0, []
        for compile_step in (program.compile_insert, program.compile_sample,
                             lambda: program.compile_prefill(16),
                             lambda: program.compile_decode(8)):
            try:
                step = compile_step()
                cells.append("ok")
                seconds += step.compile_seconds
            except Exception as e:
                cells.append("FAIL")
                notes.append(_first_line(e))
        mesh_text = f"{mesh_shape[0]},{mesh_shape[1]}"
        print(f"  {name:12s} {target_name:8s} {mesh_text:6s} {targets.num_hosts(devices):5d}  "
              f"{cells[0]:6s} {cells[1]:6s} {cells[2]:11s} {cells[3]:9s} {seconds:9.0f}"
              + "".join(f"\n      {n}" for n in notes))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chips", default="v5e,v6e")
    p.add_argument("--grid", choices=("full", "covering"), default="full")
    p.add_argument("--no-kernels", action="store_true")
    p.add_argument("--no-serving", action="store_true")
    args = p.parse_args(argv)
    import jax
    import libtpu  # noqa: F401  (fail early, plainly, without it)

    print(f"jax {jax.__version__}, libtpu {_libtpu_version()}")
    if not args.no_kernels:
        kernel_matrix(args.chips.split(","), args.grid)
    if not args.no_serving:
        serving_matrix()
    return 0


def _libtpu_version() -> str:
    from importlib.metadata import version

    return version("libtpu")


if __name__ == "__main__":
    sys.exit(main())
