"""Test session setup: CPU JAX with 8 host devices (for mesh tests), fp32 matmuls, shared
fixtures for the bundled models and tiny random configs."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def _session_dir(tmp_path_factory, name: str) -> str:
    """A folder of this test session that its xdist workers share (under the run's base
    temporary folder, not one worker's)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # .../pytest-N/popen-gwK -> .../pytest-N
    path = base / name
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A private jaxgen cache, shared by the session's workers and processes: bundled models are
    converted here once per test session (a conversion lock keeps two from converting at
    once)."""
    return _session_dir(tmp_path_factory, "jaxgen-cache")


@pytest.fixture(scope="session")
def xla_cache_dir(tmp_path_factory):
    """A private persistent compilation cache shared by the session's workers and server
    processes, so a program compiles once per session (engines of the same model and shapes
    in many tests)."""
    return _session_dir(tmp_path_factory, "xla-cache")


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(xla_cache_dir):
    from jaxgen.runtime.compile_cache import enable_compilation_cache

    enable_compilation_cache(xla_cache_dir)


# Files whose time goes to XLA:CPU compiling many small programs (tiny random models, kernels
# in interpret mode, meshes of small models) rather than running them: their programs compile
# with XLA's backend optimisations off (`jax_disable_most_optimizations`: LLVM at -O0), which
# shortens their compile time more than it lengthens their runs (docs/reliability.md has the
# measurement). Both sides of every comparison in them compile the same way. Tests of real
# checkpoints (marked `slow`: HF parity, real-model speculative decoding, ...) and tests marked
# `optimized` keep the optimised programs, in these files too. JAXGEN_TEST_OPTIMIZE=1 compiles
# everything optimised.
FAST_COMPILE = frozenset({"test_layers.py", "test_attention_xla.py", "test_attention_tpu.py",
                          "test_attention_gpu.py", "test_attention_reference.py", "test_mesh.py",
                          "test_sampling.py", "test_tools.py", "test_hf_safetensors.py",
                          "test_engine.py", "test_speculative.py",
                          "test_engine_overlap.py", "test_paged_consistency.py",
                          "test_server_units.py", "test_engine_surface.py", "test_watchdog.py",
                          "test_overload.py", "test_checkpoint_fuzz.py"})


def _set_fast_compile(on: bool):
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", on)
    return before


@pytest.fixture(scope="module", autouse=True)
def _fast_compile(request):
    """On for a FAST_COMPILE file's module fixtures and tests; restored after it."""
    if request.path.name not in FAST_COMPILE or os.environ.get("JAXGEN_TEST_OPTIMIZE"):
        yield
        return
    before = _set_fast_compile(True)
    yield
    _set_fast_compile(before)


@pytest.fixture(autouse=True)
def _optimized_tests(request, _fast_compile):
    """Off again, inside a FAST_COMPILE file, for a `slow` (real-checkpoint) test and one marked
    `optimized` (it runs its programs far more than it compiles them)."""
    if not any(request.node.get_closest_marker(m) for m in ("slow", "optimized")):
        yield
        return
    before = _set_fast_compile(False)
    yield
    _set_fast_compile(before)


pytest_plugins = ["tests.served"]  # the session's `jaxgen serve` processes (gRPC and HTTP tests)

# `make test` runs three xdist workers taking one file at a time (--dist loadfile); pytest-xdist
# hands the files out in its own order (most tests first), whatever order collection gives them.
# Three on the two-core CI box: the front-end, multi-process and restart tests spend much of
# their time waiting on other processes, which a third worker fills (docs/reliability.md).
