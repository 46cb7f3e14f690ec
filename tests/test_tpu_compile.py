"""The real TPU compiler on a CPU host: libtpu compiles the TPU attention kernels (Mosaic
included) and the engine's serving program for TPU chips and pod slices that are not attached
(deviceless AOT through `jax.experimental.topologies`).

Kernels: the issue's grid (Hq/Hkv/D 32/8/128, 4/1/256, 8/8/64 x bf16, f32 x decode, mixed), each
(heads, dtype, mode) with a window / soft-cap / page-size combination chosen so that every level
of those three meets every heads config, dtype and mode (`kernels.covering_grid`: an orthogonal
array instead of the 96-case product, which tools/tpu_compile_matrix.py runs), plus every
configuration the interpreter tests run (non-default block sizes) in both dtypes; all for v5e
and v6e. The serving program: Gemma 3 270M and the Llama-3-8B shape
in bf16 with the TPU kernels, on one chip and on v5e:4x4 (4 hosts) with mesh (4,4) as `jaxgen
plan` builds it; the other slice meshes ((1,4), (2,2) on v5e:2x2, (1,16) on v5e:4x4) compile
the decode step of the 8B shape cut to two layers (its partitioning is per layer). Skipped, with
the reason, when libtpu is not installed.
"""

import concurrent.futures
import functools
import os
import subprocess
import sys

import jax
import pytest

pytest.importorskip("libtpu", reason="libtpu (the TPU compiler) is not installed: "
                                     "pip install 'libtpu==0.0.42.*' (it is in jaxgen[test])")

from jaxgen.config import EngineConfig  # noqa: E402
from jaxgen.models import Model  # noqa: E402
from jaxgen.planning import cli, programs, targets  # noqa: E402
from jaxgen.planning.kernels import AttentionCase, compile_attention, covering_grid  # noqa: E402
from jaxgen.planning.model_shapes import model_config  # noqa: E402
from jaxgen.planning.plan import PlanRequest, make_plan  # noqa: E402
from jaxgen.sampling_params import GREEDY  # noqa: E402
from tests.test_attention_tpu import DECODE, MIXED  # noqa: E402

CHIPS = ("v5e", "v6e")


def _interpreter_cases():
    """Every configuration tests/test_attention_tpu.py runs, in both dtypes."""
    cases = []
    for decode, table in ((False, MIXED), (True, DECODE)):
        for seqs, hq, hkv, d, page, window, cap, _, blocks in table.values():
            rows = len(seqs) + 1  # the idle row too
            tokens = rows if decode else sum(q for _, q in seqs) + 3
            cases += [AttentionCase(hq, hkv, d, dtype, decode, window, cap, page, tokens, rows,
                                    pages_per_seq=8, num_pages=64, block_sizes=blocks)
                      for dtype in ("bfloat16", "float32")]
    return cases


KERNELS = {case.name: case for case in covering_grid() + _interpreter_cases()}


@functools.cache
def chip_device(chip: str):
    return targets.target_devices(targets.parse_target(f"{chip}-1"))[0]


@pytest.fixture(scope="module")
def compiled_kernels():
    """Every (chip, case) compiled up front, two at a time (XLA compiles without the GIL while
    the next kernel is traced): {(chip, name): compiled executable or the exception}."""
    def compile_one(key):
        chip, name = key
        try:
            return key, compile_attention(chip_device(chip), KERNELS[name])
        except Exception as e:  # reported by the test of that case
            return key, e

    keys = [(chip, name) for chip in CHIPS for name in KERNELS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(compile_one, keys))


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("name", KERNELS)
def test_kernel_compiles(chip, name, compiled_kernels):
    compiled = compiled_kernels[chip, name]
    if isinstance(compiled, Exception):
        raise compiled
    assert "tpu_custom_call" in compiled.as_text()


def test_kernel_cost_estimate_reaches_xla():
    """XLA's cost analysis of a decode call is the kernel's estimate: one exp and one tanh per
    score of 16 rows x 32 q heads against 64 pages of 16 tokens, and 4 * D FLOPs per score."""
    case = AttentionCase(32, 8, 128, "bfloat16", True, None, 30.0, 16, tokens=16, seqs=16,
                         pages_per_seq=64)
    cost = compile_attention(chip_device("v5e"), case).cost_analysis()
    scores = 16 * 32 * 64 * 16
    assert cost["transcendentals"] == 2 * scores
    assert 4 * 128 * scores <= cost["flops"] < 1.01 * 4 * 128 * scores


def _engine(**kw):
    return EngineConfig(**({"num_slots": 8, "max_model_len": 256, "max_prefill_tokens": 16} | kw))


SERVING = {  # (model, target, mesh)
    "gemma3-270m-v5e-1": ("gemma3-270m", "v5e-1", None),
    "gemma3-270m-v5e:4x4-mesh4x4": ("gemma3-270m", "v5e:4x4", (4, 4)),
    # One v5e chip cannot hold the 8B shape's decode program (test below): one v6e chip can.
    "llama-3-8b-v6e-1": ("llama-3-8b", "v6e-1", None),
    "llama-3-8b-v5e:4x4-mesh4x4": ("llama-3-8b", "v5e:4x4", (4, 4)),
}


@pytest.mark.parametrize("model, target, mesh", SERVING.values(), ids=SERVING.keys())
def test_serving_program_compiles(model, target, mesh):
    """insert, the sampling of prefilled rows, a prefill bucket and generate compile, with the
    per-chip weights and pool of the mesh's sharding."""
    plan = make_plan(PlanRequest(model, target, _engine(), mesh=mesh, level=GREEDY))
    assert plan.failure is None, plan.failure
    assert [s.step.name for s in plan.steps] == ["insert", "sample", "prefill[16]", "decode[8]"]
    cfg = plan.config
    model_axis = plan.mesh[1]
    kv_split = cfg.num_kv_heads % model_axis == 0
    pool = (cfg.num_layers * plan.memory.num_pages * 16 * 2 * cfg.num_kv_heads * cfg.head_dim * 2
            // (model_axis if kv_split else 1))
    assert plan.memory.kv_pool == pool
    if model_axis > 1:  # sharded weights: well under the whole model's bytes on each chip
        whole = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(Model(cfg).abstract_params))
        assert plan.memory.weights < whole / 2
    assert plan.num_hosts == (4 if target == "v5e:4x4" else 1)
    decode = plan.steps[-1]
    assert decode.roofline.bound == "memory" and decode.step.xla_seconds > 0
    text = cli.render(plan)
    assert text.endswith("\nfits") and "decode[8]" in text and "headroom" in text


SLICE_MESHES = {"v5e:2x2-mesh1x4": ("v5e:2x2", (1, 4)), "v5e:2x2-mesh2x2": ("v5e:2x2", (2, 2)),
                "v5e:4x4-mesh1x16": ("v5e:4x4", (1, 16))}


@pytest.mark.parametrize("target, mesh", SLICE_MESHES.values(), ids=SLICE_MESHES.keys())
def test_decode_partitions_on_slice_meshes(target, mesh):
    """Two layers of the 8B shape: kv heads split over model (1,4), split and replicated over
    data (2,2), or replicated because 8 kv heads do not divide 16 (1,16)."""
    cfg = model_config("llama-3-8b").replace(num_layers=2)
    devices = targets.target_devices(targets.parse_target(target))
    program = programs.ServingProgram(Model(cfg, attn_backend="tpu"),
                                      programs.target_mesh(devices, mesh), _engine().resolved(8192),
                                      9, GREEDY)
    step = program.compile_decode(8)
    split = 8 % mesh[1] == 0
    assert step.alias_bytes >= programs.device_bytes(program.pages)
    whole_pool = 2 * 9 * 16 * 16 * 128 * 2  # layers x pages x page x 2*Hkv x D x bf16
    assert programs.device_bytes(program.pages) == whole_pool // (mesh[1] if split else 1)


def test_decode_cost_is_one_step():
    """XLA's cost analysis counts generate's on-device loop body once: the planner's decode
    figures are per step whatever decode_steps is."""
    cfg = model_config("gemma3-270m").replace(num_layers=1)
    devices = targets.target_devices(targets.parse_target("v5e-1"))
    mesh = programs.target_mesh(devices, (1, 1))
    flops = [programs.ServingProgram(Model(cfg, attn_backend="tpu"), mesh,
                                     _engine(decode_steps=k).resolved(32768), 9, GREEDY)
             .compile_decode(4).flops for k in (1, 4)]
    assert flops[0] == pytest.approx(flops[1], rel=0.01)


def test_8b_on_one_v5e_chip_does_not_fit():
    """The acceptance case: 8 slots x 8192 tokens of the 8B shape on one v5e chip; reported as
    not fitting, with the numbers, before anything is compiled."""
    plan = make_plan(PlanRequest("llama-3-8b", "v5e-1", _engine(max_model_len=8192)))
    assert plan.failure.startswith("does not fit: weights 14.96 GiB + KV pool 8.02 GiB")
    assert "v5e usable HBM 15.75 GiB" in plan.failure
    assert plan.steps == () and plan.memory.max_slots == 0


def test_plan_cli_names_the_limit(capsys):
    """`jaxgen plan` for the case above: exit status 1, and the JSON carries the numbers."""
    import json

    assert cli.main(["--model", "llama-3-8b", "--target", "v5e-1", "--slots", "8",
                     "--max-model-len", "8192", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert not out["fits"] and out["failure"].startswith("does not fit")
    memory = out["memory_per_device"]
    assert memory["weights"] > 14 * 2**30 and memory["kv_pool"] == 4105 * 32 * 16 * 16 * 128 * 2


@pytest.mark.parametrize("argv, message", [
    (["--target", "h100"], "target='h100': GPU targets cannot be planned here"),
    (["--target", "v5x:2x2"], "target='v5x:2x2': unknown chip 'v5x'"),
    (["--target", "v5e:2x2", "--mesh", "2,4"], "mesh=2,4: 8 devices, but the target has 4"),
    (["--target", "v5e-1", "--page-size", "24"], "page-size=24: must be a positive multiple of 16"),
    (["--target", "v5e-1", "--slots", "0"], "slots=0: must be an integer >= 1"),
])
def test_plan_cli_rejects_bad_flags_in_one_line(argv, message, capsys):
    assert cli.main(["--model", "gemma3-270m", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["--decode-batches", "1,0"], "--decode-batches: '1,0': must be comma-separated batch sizes >= 1"),
    (["--mesh", "0,4"], "--mesh: mesh='0,4': must be two positive sizes (data, model)"),
])
def test_plan_cli_refuses_bad_sizes_before_compiling(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--model", "gemma3-270m", "--target", "v5e-1", *argv])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_targets_described_from_several_threads_at_first_use():
    """A fresh process describing four targets from four threads at once, as the planner's and
    this file's thread pools do: each gets its devices. Loading libtpu's PJRT plugin from two
    threads at once failed one of them (ALREADY_EXISTS) in one to two runs of three here, and
    once left the process to crash in a later compile (the full suite's test_tpu_compile.py)."""
    code = """
import concurrent.futures
import os
import subprocess
import sys
from jaxgen.planning import targets
def one(spec):
    try:
        return len(targets.target_devices(targets.parse_target(spec)))
    except Exception as e:
        return repr(e)
with concurrent.futures.ThreadPoolExecutor(4) as pool:
    print(list(pool.map(one, ["v5e-1", "v6e-1", "v5e:2x2", "v6e-1"])))
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[1, 1, 4, 1]", run.stdout
