"""Sign-power amplification against its closed form, its properties, bad args."""

from __future__ import annotations

import functools

import chex
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import strategies as st

import optax_stab

SIZE = 16
NAN, INF = float("nan"), float("inf")


@functools.cache
def _sign_power():
    """One jitted function of (g, power, threshold): compiled once per dtype."""

    def run(g, power, threshold):
        tx = optax_stab.sign_power(power, threshold)
        return tx.update(g, tx.init(g))[0]

    return jax.jit(run)


@functools.cache
def _sign_sqrt():
    def run(g, threshold):
        tx = optax_stab.sign_sqrt_amplification(threshold)
        return tx.update(g, tx.init(g))[0]

    return jax.jit(run)


def ref_sign_power(g, power, threshold):
    g = np.asarray(g, np.float64)
    return np.sign(g) * threshold * (np.abs(g) / threshold) ** power


magnitudes = st.floats(2.0**-20, 2.0**20, width=32)
vectors = st.lists(
    st.one_of(magnitudes, magnitudes.map(lambda x: -x), st.just(0.0)),
    min_size=SIZE,
    max_size=SIZE,
).map(lambda v: np.asarray(v, np.float32))
powers = st.floats(0.0, 1.0)
thresholds = st.floats(1e-3, 1e3)


class SignPowerTest(parameterized.TestCase):
    @hypothesis.given(g=vectors, power=powers, threshold=thresholds)
    def test_matches_closed_form(self, g, power, threshold):
        u = _sign_power()(g, power, threshold)
        expected = ref_sign_power(g, np.float32(power), np.float32(threshold))
        np.testing.assert_allclose(u, expected, rtol=2e-5, atol=1e-30)

    @hypothesis.given(g=vectors, power=powers, threshold=thresholds)
    def test_is_odd(self, g, power, threshold):
        fn = _sign_power()
        np.testing.assert_array_equal(
            fn(-g, power, threshold), -fn(g, power, threshold)
        )

    @hypothesis.given(g=vectors, power=powers, threshold=thresholds)
    def test_is_monotone(self, g, power, threshold):
        x = np.sort(g)
        u = np.asarray(_sign_power()(x, power, threshold), np.float64)
        # Non-decreasing up to one float32 rounding of the larger value.
        assert np.all(np.diff(u) >= -4e-7 * np.abs(u[1:]))

    @hypothesis.given(g=vectors, power=powers, threshold=thresholds)
    def test_amplifies_below_and_shrinks_above_the_threshold(self, g, power, threshold):
        u = np.abs(np.asarray(_sign_power()(g, power, threshold), np.float64))
        a, t = np.abs(g.astype(np.float64)), np.float32(threshold)
        tol = 1e-6 * np.maximum(a, u)
        below, above = a < t, a > t
        assert np.all(u[below] >= a[below] - tol[below])
        assert np.all(u[above] <= a[above] + tol[above])
        assert np.all(u[below] <= t * (1 + 1e-6))  # and never past the threshold
        assert np.all(u[above] >= t * (1 - 1e-6))

    @hypothesis.given(power=powers, threshold=thresholds)
    def test_fixes_the_threshold_magnitude(self, power, threshold):
        t = np.float32(threshold)
        g = np.array([t, -t] + [0.0] * (SIZE - 2), np.float32)
        u = _sign_power()(g, power, threshold)
        np.testing.assert_allclose(u[:2], [t, -t], rtol=1e-6)
        np.testing.assert_array_equal(u[2:], 0.0)

    def test_power_zero_is_scaled_sign_descent_and_one_the_identity(self):
        g = np.array([-3.0, -0.01, 0.0, 0.5, 200.0] + [1.0] * (SIZE - 5), np.float32)
        fn = _sign_power()
        np.testing.assert_array_equal(fn(g, 0.0, 2.0), 2.0 * np.sign(g))
        np.testing.assert_allclose(fn(g, 1.0, 2.0), g, rtol=1e-6)

    def test_exactly_zero_at_zero_with_finite_derivatives(self):
        def f(g, power, threshold):
            return jnp.sum(_sign_power()(g, power, threshold))

        g = jnp.zeros(SIZE)
        np.testing.assert_array_equal(_sign_power()(g, 0.5, 1.0), np.zeros(SIZE))
        for p in (0.0, 0.25, 0.5, 1.0):
            grads = jax.grad(f, argnums=(0, 1, 2))(g, p, 1.0)
            chex.assert_tree_all_finite(grads)
            np.testing.assert_array_equal(grads[0], np.zeros(SIZE))
        # Away from 0 the derivative is the closed form p * (|g| / t)**(p - 1).
        d = jax.grad(f)(jnp.full(SIZE, 4.0), 0.5, 1.0)
        np.testing.assert_allclose(d, np.full(SIZE, 0.25), rtol=1e-6)

    def test_nonfinite_elements_pass_unchanged(self):
        g = np.array([NAN, INF, -INF, 4.0] + [0.0] * (SIZE - 4), np.float32)
        u = np.asarray(_sign_power()(g, 0.0, 1.0))
        np.testing.assert_array_equal(u[:4], [NAN, INF, -INF, 1.0])

    def test_bf16_is_computed_in_float32_and_rounded_once(self):
        g = jnp.array([0.01, -3.0, 1e4] + [0.0] * (SIZE - 3), jnp.bfloat16)
        u = _sign_power()(g, 0.5, 1.0)
        assert u.dtype == jnp.bfloat16
        expected = ref_sign_power(np.asarray(g, np.float32), 0.5, 1.0)
        np.testing.assert_allclose(np.asarray(u, np.float64), expected, rtol=2**-8)


class SignSqrtTest(parameterized.TestCase):
    @hypothesis.given(g=vectors, threshold=thresholds)
    def test_is_sign_sqrt_of_threshold_times_g(self, g, threshold):
        u = _sign_sqrt()(g, threshold)
        t = np.float64(np.float32(threshold))
        expected = np.sign(g) * np.sqrt(t * np.abs(g.astype(np.float64)))
        np.testing.assert_allclose(u, expected, rtol=2e-5, atol=1e-30)

    def test_halves_the_spread_of_log_magnitudes(self):
        g = jnp.logspace(-8, 0, SIZE)  # 8 decades below the threshold
        tx = optax_stab.sign_sqrt_amplification(1.0)
        u, _ = tx.update(g, tx.init(g))
        spread = np.log10(np.max(u)) - np.log10(np.min(u))
        np.testing.assert_allclose(spread, 4.0, rtol=1e-5)


class BadHyperparametersTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("power_negative", optax_stab.sign_power, {"power": -0.1}, "power"),
        ("power_above_one", optax_stab.sign_power, {"power": 1.5}, "power"),
        ("power_nan", optax_stab.sign_power, {"power": NAN}, "power"),
        ("threshold_zero", optax_stab.sign_power, {"threshold": 0.0}, "threshold"),
        (
            "sqrt_threshold",
            optax_stab.sign_sqrt_amplification,
            {"threshold": -1.0},
            "threshold",
        ),
    )
    def test_rejects(self, factory, kwargs, name):
        with pytest.raises(ValueError, match=f"`{name}`.*got"):
            factory(**kwargs)
