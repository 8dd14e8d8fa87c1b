"""Test setup: 8 CPU devices before JAX starts, and hypothesis profiles for jit."""

import os

import chex

chex.set_n_cpu_devices(8)

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
