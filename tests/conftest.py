"""Test setup: 8 CPU devices before JAX starts, and hypothesis profiles for jit."""

import atexit
import os
import re
import shutil
import tempfile
from importlib.metadata import version

import pytest

# Compile faster: the suite is dominated by XLA compiles of small programs, and
# LLVM's optimisation passes are most of each. Results stay IEEE float32 (no
# fast math at any level); only the generated machine code is less tuned.
# XLA:CPU's older kernel emitters compile the suite's small programs in about
# half the time of its default MLIR fusion emitters (the whole suite: 304 s ->
# 175-204 s on 2 cores), though they compile large trees slower: the compile and
# HLO-count tests pin the default back (_bench_cases.default_pipeline).
# Speed is measured by `optax-stab bench`, never here.
_FLAGS = [
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
]
# An XLA flag that an older jaxlib does not know aborts the process, so the
# emitter flag is only set on the jaxlib it was measured with (and later).
_JAXLIB = tuple(int(v) for v in re.findall(r"\d+", version("jaxlib"))[:2])
if _JAXLIB >= (0, 10):
    _FLAGS.append("--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_FLAGS]).strip()

import chex  # noqa: E402

chex.set_n_cpu_devices(8)

import jax  # noqa: E402

# Compile each distinct program once per test session: many tests build the
# same transform on the same shapes, and JAX's persistent cache (keyed on the
# compiled module, so it can only return what a fresh compile would) lets them
# and both pytest-xdist workers share one compile. The folder is made by the
# first process (xdist workers inherit it through the environment) and removed
# by that process at exit.
if "OPTAX_STAB_TEST_JAX_CACHE" not in os.environ:
    os.environ["OPTAX_STAB_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="jax-cache-")
    atexit.register(
        shutil.rmtree, os.environ["OPTAX_STAB_TEST_JAX_CACHE"], ignore_errors=True
    )
jax.config.update("jax_compilation_cache_dir", os.environ["OPTAX_STAB_TEST_JAX_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture
def no_compilation_cache():
    """Turns the persistent cache off, for tests that time compiles."""
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", True)


import hypothesis  # noqa: E402

hypothesis.settings.register_profile(
    "ci",
    deadline=None,
    max_examples=15,
    derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.register_profile(
    "dev",
    deadline=None,
    max_examples=50,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
