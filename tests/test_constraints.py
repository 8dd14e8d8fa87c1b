"""Weight clipping and the L1 penalty against closed forms, properties, bad args."""

from __future__ import annotations

import functools

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from hypothesis import strategies as st

import optax_stab
from optax_stab import _validate

SIZE = 16
NAN, INF = float("nan"), float("inf")

vectors = st.lists(
    st.floats(-10.0, 10.0, width=32, allow_subnormal=False),
    min_size=SIZE,
    max_size=SIZE,
).map(lambda v: np.asarray(v, np.float32))


@functools.cache
def _clip_weights():
    def run(u, w, max_abs):
        tx = optax_stab.clip_weights(max_abs)
        out, _ = tx.update(u, tx.init(w), w)
        return out, optax.apply_updates(w, out)

    return jax.jit(run)


@functools.cache
def _l1():
    def run(g, w, strength):
        tx = optax_stab.add_l1_penalty(strength)
        return tx.update(g, tx.init(w), w)[0]

    return jax.jit(run)


class ClipWeightsTest(parameterized.TestCase):
    @hypothesis.given(u=vectors, w=vectors, max_abs=st.floats(0.01, 5.0))
    def test_result_is_the_projection_and_inside_the_box(self, u, w, max_abs):
        out, new_w = _clip_weights()(u, w, max_abs)
        m = np.float32(max_abs)
        new_w = np.asarray(new_w)
        assert np.all(np.abs(new_w) <= m)
        w64, u64 = w.astype(np.float64), u.astype(np.float64)
        np.testing.assert_allclose(new_w, np.clip(w64 + u64, -m, m), atol=2e-6)
        np.testing.assert_allclose(out, np.clip(w64 + u64, -m, m) - w64, atol=2e-6)

    def test_weights_inside_the_box_after_an_inside_step_move_unchanged(self):
        w = jnp.array([0.1, -0.2, 0.3] + [0.0] * (SIZE - 3))
        u = jnp.full(SIZE, 0.05)
        out, new_w = _clip_weights()(u, w, 1.0)
        np.testing.assert_allclose(out, u, rtol=1e-6)
        np.testing.assert_allclose(new_w, w + u, rtol=1e-6)

    def test_needs_params(self):
        tx = optax_stab.clip_weights(1.0)
        with pytest.raises(ValueError, match="needs `params`") as err:
            tx.update(jnp.ones(3), tx.init(jnp.ones(3)))
        assert str(err.value) == _validate.NO_PARAMS_MSG

    def test_nonfinite_update_elements_pass_unchanged(self):
        u = jnp.array([NAN, INF, -INF] + [5.0] * (SIZE - 3))
        out, _ = _clip_weights()(u, jnp.zeros(SIZE), 1.0)
        np.testing.assert_array_equal(out[:4], [NAN, INF, -INF, 1.0])

    def test_bf16_params_with_float32_updates(self):
        w = jnp.array([0.5, -0.9, 0.99] + [0.0] * (SIZE - 3), jnp.bfloat16)
        u = jnp.array([1.0, -1.0, 0.001] + [0.0] * (SIZE - 3), jnp.float32)
        tx = optax_stab.clip_weights(1.0)
        out, _ = tx.update(u, tx.init(w), w)
        assert out.dtype == jnp.float32
        new_w = optax.apply_updates(w, out)
        assert new_w.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.asarray(new_w[:3], np.float32), [1.0, -1.0, 0.99], rtol=2**-8
        )


class AddL1PenaltyTest(parameterized.TestCase):
    @hypothesis.given(g=vectors, w=vectors, strength=st.floats(0.0, 10.0))
    def test_adds_strength_times_sign_of_params(self, g, w, strength):
        out = _l1()(g, w, strength)
        expected = g.astype(np.float64) + np.float32(strength) * np.sign(w)
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)

    @hypothesis.given(g=vectors, w=vectors)
    def test_zero_strength_is_the_identity_bit_for_bit(self, g, w):
        np.testing.assert_array_equal(_l1()(g, w, 0.0), g)

    def test_is_the_gradient_of_the_l1_norm(self):
        w = jnp.array([2.0, -3.0, 0.5] + [1.0] * (SIZE - 3))
        penalty_grad = jax.grad(lambda p: 0.3 * jnp.sum(jnp.abs(p)))(w)
        np.testing.assert_allclose(_l1()(jnp.zeros(SIZE), w, 0.3), penalty_grad)

    def test_needs_params(self):
        tx = optax_stab.add_l1_penalty(0.1)
        with pytest.raises(ValueError, match="needs `params`"):
            tx.update(jnp.ones(3), tx.init(jnp.ones(3)))


class BadHyperparametersTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("clip_zero", optax_stab.clip_weights, {"max_abs": 0.0}, "max_abs"),
        ("clip_nan", optax_stab.clip_weights, {"max_abs": NAN}, "max_abs"),
        ("l1_negative", optax_stab.add_l1_penalty, {"strength": -1.0}, "strength"),
        ("l1_string", optax_stab.add_l1_penalty, {"strength": "big"}, "strength"),
    )
    def test_rejects(self, factory, kwargs, name):
        with pytest.raises(ValueError, match=f"`{name}`.*got"):
            factory(**kwargs)
