"""Norm helpers: float32 accumulation, zero safety, axis_name reduction."""

from __future__ import annotations

import functools

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_stab import _tree


def test_bf16_global_norm_is_accumulated_in_float32():
    leaves = [jnp.ones(1000, jnp.bfloat16) for _ in range(1000)]
    ours = float(_tree.global_norm(leaves))
    np.testing.assert_allclose(ours, 1000.0, rtol=5e-3)
    # optax rounds the sum of squares through bfloat16 and is far off.
    theirs = float(optax.tree.norm(leaves))
    assert abs(theirs - 1000.0) > 0.1 * 1000.0


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
