"""inverse_sqrt_decay against its closed form, inside optax, bad args."""

from __future__ import annotations

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from hypothesis import strategies as st

import optax_stab

NAN, INF = float("nan"), float("inf")


@jax.jit
def _values(init_value, alpha, total_steps, counts):
    schedule = optax_stab.inverse_sqrt_decay(init_value, alpha, total_steps)
    return jax.vmap(schedule)(counts)


COUNTS = jnp.arange(0, 400, 7, dtype=jnp.int32)


@hypothesis.given(
    init_value=st.floats(1e-5, 10.0),
    alpha=st.floats(0.0, 100.0),
    total_steps=st.integers(1, 10_000),
)
def test_matches_closed_form(init_value, alpha, total_steps):
    got = _values(init_value, alpha, total_steps, COUNTS)
    t = np.asarray(COUNTS, np.float64)
    expected = init_value / np.sqrt(1 + alpha * t / total_steps)
    np.testing.assert_allclose(got, expected, rtol=2e-6)
    assert got.dtype == jnp.float32
    assert np.all(np.diff(np.asarray(got)) <= 0)  # never increases


def test_landmarks():
    schedule = optax_stab.inverse_sqrt_decay(0.1, alpha=3.0, total_steps=100)
    np.testing.assert_allclose(schedule(0), 0.1)
    np.testing.assert_allclose(schedule(100), 0.05, rtol=1e-6)  # 0.1 / sqrt(4)
    np.testing.assert_allclose(schedule(400), 0.1 / np.sqrt(13), rtol=1e-6)
    constant = optax_stab.inverse_sqrt_decay(0.1, alpha=0.0, total_steps=100)
    np.testing.assert_allclose(constant(10**6), 0.1)


def test_drives_sgd_step_by_step():
    schedule = optax_stab.inverse_sqrt_decay(0.5, alpha=8.0, total_steps=4)
    opt = optax.sgd(schedule)
    w = jnp.zeros(2)
    state = opt.init(w)
    update = jax.jit(opt.update)
    for t in range(6):
        u, state = update(jnp.ones(2), state, w)
        np.testing.assert_allclose(
            u, -0.5 / np.sqrt(1 + 2.0 * t) * np.ones(2), rtol=1e-6
        )


class BadArgumentsTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("init_nan", {"init_value": NAN}, "init_value"),
        ("init_inf", {"init_value": INF}, "init_value"),
        ("alpha_negative", {"alpha": -1.0}, "alpha"),
        ("total_zero", {"total_steps": 0}, "total_steps"),
    )
    def test_rejects(self, kwargs, name):
        args = {"init_value": 0.1, "alpha": 1.0, "total_steps": 10, **kwargs}
        with pytest.raises(ValueError, match=f"`{name}`.*got"):
            optax_stab.inverse_sqrt_decay(**args)
