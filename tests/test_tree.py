"""Norm helpers: float32 accumulation, zero safety, axis_name reduction."""

from __future__ import annotations

import functools

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_stab import _tree


def test_bf16_norms_match_a_float64_reference():
    # Integers in [-15, 15] are exact in bfloat16 (8-bit significand), so the
    # inputs carry no rounding; their squares and every partial sum of 64 Ki of
    # them are integers below 2**24, exact in float32 in any summation order.
    # So a float32 accumulation is exact and only the final square root rounds
    # (2**-24 relative; the tolerance allows a few ulps). Rounding the sum of
    # squares to bfloat16 even once errs by up to 2**-9, 2**-10 in the norm.
    rng = np.random.default_rng(0)
    values = rng.integers(-15, 16, size=(16, 4096))
    tree = [jnp.asarray(v, jnp.bfloat16) for v in values]
    reference = np.sqrt(np.sum(np.square(values.astype(np.float64))))
    norm = _tree.global_norm(tree)
    assert norm.dtype == jnp.float32
    np.testing.assert_allclose(float(norm), reference, rtol=2e-7)
    leaf = _tree.leaf_norms(tree)
    row_reference = np.sqrt(np.sum(np.square(values.astype(np.float64)), axis=1))
    np.testing.assert_allclose(np.asarray(leaf, np.float64), row_reference, rtol=2e-7)


@hypothesis.given(
    w=st.lists(st.floats(-1e3, 1e3, width=32), min_size=6, max_size=6),
    b=st.lists(st.floats(-1e3, 1e3, width=32), min_size=3, max_size=3),
)
def test_norms_match_numpy(w, b):
    tree = {
        "w": jnp.asarray(w, jnp.float32).reshape(2, 3),
        "b": jnp.asarray(b, jnp.float32),
    }
    leaf = _tree.leaf_norms(tree)
    np.testing.assert_allclose(
        float(leaf["w"]), np.linalg.norm(np.float64(w)), rtol=1e-5, atol=1e-30
    )
    np.testing.assert_allclose(
        float(leaf["b"]), np.linalg.norm(np.float64(b)), rtol=1e-5, atol=1e-30
    )
    np.testing.assert_allclose(
        float(_tree.global_norm(tree)),
        np.linalg.norm(np.float64(w + b)),
        rtol=1e-5,
        atol=1e-30,
    )


def test_norm_value_and_gradient_are_zero_safe():
    zeros = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2), jnp.bfloat16)}
    assert float(_tree.global_norm(zeros)) == 0.0
    grad = jax.grad(lambda t: _tree.global_norm(t))(zeros)
    for g in jax.tree.leaves(grad):
        assert np.all(np.isfinite(np.asarray(g, np.float32)))
    g_leaf = jax.grad(lambda x: _tree.leaf_norms({"x": x})["x"])(jnp.zeros(4))
    np.testing.assert_array_equal(g_leaf, np.zeros(4))


def test_nonfinite_values_propagate():
    assert np.isnan(float(_tree.global_norm({"a": jnp.array([1.0, jnp.nan])})))
    assert np.isinf(float(_tree.global_norm({"a": jnp.array([1.0, -jnp.inf])})))
    assert not bool(_tree.all_finite({"a": jnp.ones(2), "b": jnp.array([jnp.inf])}))
    assert bool(_tree.all_finite({"a": jnp.ones(2)}))


@functools.cache
def _mesh():
    return jax.make_mesh((8,), ("d",))


def test_axis_name_sums_squared_norms_across_shards():
    x = jax.random.normal(jax.random.key(0), (8, 5))
    tree = {"x": x, "y": 2 * x}

    @functools.partial(
        jax.shard_map, mesh=_mesh(), in_specs=P("d"), out_specs=(P(), P())
    )
    def sharded(t):
        return _tree.global_norm(t, axis_name="d"), _tree.leaf_norms(t, axis_name="d")[
            "y"
        ]

    split = jax.device_put(tree, NamedSharding(_mesh(), P("d")))
    g, y = sharded(split)
    np.testing.assert_allclose(float(g), float(_tree.global_norm(tree)), rtol=1e-6)
    np.testing.assert_allclose(float(y), float(jnp.linalg.norm(2 * x)), rtol=1e-6)


def test_map_unzip_and_any_leaf():
    tree = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([3.0])}
    pos, neg = _tree.map_unzip(lambda x: (x > 0, x < 0), tree, n=2)
    np.testing.assert_array_equal(pos["a"], [True, False])
    np.testing.assert_array_equal(neg["b"], [False])
    assert bool(_tree.any_leaf(neg)) and not bool(_tree.any_leaf({"b": neg["b"]}))
    assert _tree.map_unzip(lambda x: (x, x), {}, n=2) == ({}, {})
    assert not bool(_tree.any_leaf({}))
