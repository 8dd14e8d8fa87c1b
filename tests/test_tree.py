"""Norm helpers: float32 accumulation, zero safety, axis_name reduction."""

from __future__ import annotations

import functools
import logging

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


# ------------------------------------------- range: overflow, underflow, complex
# Issue 10.4/10.5. References are float64 norms of the float32 (or bfloat16)
# inputs. Tolerance: a float32 sum of n non-negative squares is within
# (n + 1) * 2**-24 of the exact one (each square and add rounds once; the
# power-of-two rescaling is exact), the sqrt halves that and adds 2**-24;
# elements lost to underflow add at most 2**-62 relative. For n <= 9 that is
# under 4e-7; rtol 1e-6 leaves room without hiding a lost or doubled term.
RANGE_RTOL = 1e-6
_norms = jax.jit(lambda t: (_tree.global_norm(t), _tree.leaf_norms(t)))
_vector = jax.jit(_tree.leaf_norm_vector)


def _ref(x) -> float:
    return float(np.linalg.norm(np.asarray(x).astype(np.complex128).ravel()))


RANGE_CASES = {
    "huge": {"a": np.full(4, 1e30, np.float32), "b": np.float32([3e30, -4e30])},
    "tiny": {"a": np.full(4, 1e-30, np.float32), "b": np.float32([3e-30, -4e-30])},
    "mixed": {"a": np.float32([1e30, 1e-30]), "b": np.float32([1e-30, -2e-30])},
    "near_max": {
        "a": np.float32([3e38, 0.0]),
        "b": np.float32([2e-38]),
    },  # normal: 1.2e-38 and up
    "complex": {
        "a": np.complex64([3 + 4j, 1e30 - 1e30j]),
        "b": np.complex64([1e-30j, 2e-30]),
    },
    "bf16": {
        "a": jnp.asarray([1e30, -1e30], jnp.bfloat16),
        "b": jnp.asarray([1e-30, 3e-30], jnp.bfloat16),
    },
}


@pytest.mark.parametrize("case", RANGE_CASES, ids=str)
def test_huge_tiny_mixed_complex_and_bf16_norms_match_float64(case):
    tree = RANGE_CASES[case]
    g, leaf = _norms(tree)
    flat = np.concatenate(
        [np.asarray(x).astype(np.complex128).ravel() for x in tree.values()]
    )
    np.testing.assert_allclose(float(g), _ref(flat), rtol=RANGE_RTOL)
    refs = [_ref(x) for x in jax.tree.leaves(tree)]
    for k, x in tree.items():
        np.testing.assert_allclose(float(leaf[k]), _ref(x), rtol=RANGE_RTOL)
    np.testing.assert_allclose(np.asarray(_vector(tree)), refs, rtol=RANGE_RTOL)


def test_complex_norm_uses_the_modulus():
    assert float(_tree.global_norm([jnp.array([3 + 4j], jnp.complex64)])) == 5.0


def test_a_norm_beyond_float32_max_is_inf_and_nan_stays_nan():
    g, leaf = _norms({"a": np.float32([3e38, 3e38]), "b": np.float32([np.nan])})
    assert np.isnan(float(g)) and np.isinf(float(leaf["a"]))
    assert np.isnan(float(leaf["b"]))
    g, _ = _norms({"a": np.float32([3e38, 3e38]), "b": np.float32([1.0])})
    assert np.isinf(float(g))


# Values sign * m * 10**e, e in [-30, 30]: every draw spans the fast path, the
# overflow rescue and the underflow rescue, alone or mixed in one tree.
range_values = st.tuples(
    st.sampled_from([-1.0, 1.0]), st.floats(1.0, 9.99), st.integers(-30, 30)
).map(lambda t: t[0] * t[1] * 10.0 ** t[2])


@hypothesis.given(
    w=st.lists(range_values, min_size=6, max_size=6),
    b=st.lists(range_values, min_size=3, max_size=3),
)
def test_norms_of_values_from_1e_30_to_1e30_match_float64(w, b):
    tree = {
        "b": np.asarray(b, np.float32),
        "w": np.asarray(w, np.float32).reshape(2, 3),
    }
    g, leaf = _norms(tree)
    whole = np.concatenate([tree["b"], tree["w"].ravel()])
    np.testing.assert_allclose(float(g), _ref(whole), rtol=RANGE_RTOL)
    for k in tree:
        np.testing.assert_allclose(float(leaf[k]), _ref(tree[k]), rtol=RANGE_RTOL)
    refs = [_ref(tree["b"]), _ref(tree["w"])]  # leaf order: sorted keys
    np.testing.assert_allclose(np.asarray(_vector(tree)), refs, rtol=RANGE_RTOL)


def test_stacked_small_leaves_are_rescued_row_by_row():
    # Same-shape small leaves are summed again stacked when any leaf needs the
    # rescue, each row scaled by its own power of two: rows that overflow,
    # underflow, are zero, NaN, beyond float32's max or plain sit side by side,
    # with a large leaf (summed alone) and a leaf of another shape.
    rows = np.float32(
        [[3e30, 4e30, 0], [3e-30, 4e-30, 0], [1, 2, 2], [0, 0, 0], [1, np.nan, 0]]
    )
    tree = [*rows, np.float32([3e38, 3e38, 0]), np.full(5000, 1e-3, np.float32)]
    tree.append(np.float32([[1e-25, 0], [0, 1e-25]]))
    refs = np.asarray([_ref(x) for x in tree])
    plain = np.array([0, 1, 2, 3, 6, 7])  # 4: NaN; 5: 4.2e38, beyond float32
    leaf = _norms(tree)[1]
    for got in (np.asarray(_vector(tree)), np.asarray(leaf)):
        np.testing.assert_allclose(got[plain], refs[plain], rtol=RANGE_RTOL)
        assert np.isnan(got[4]) and np.isinf(got[5])


def test_vmap_and_gradient_of_a_rescued_norm():
    # Under vmap the rescue's cond is a select: rows of every range at once.
    rows = jnp.array([[3e30, 4e30], [3.0, 4.0], [3e-30, 4e-30], [0.0, 0.0]])
    norms = jax.jit(jax.vmap(_tree.global_norm))(rows)
    np.testing.assert_allclose(norms, [5e30, 5.0, 5e-30, 0.0], rtol=RANGE_RTOL)
    # d|x|/dx = x / |x| whatever the scale, 0 (not NaN) at 0.
    grads = jax.jit(jax.vmap(jax.grad(_tree.global_norm)))(rows)
    want = [[0.6, 0.8], [0.6, 0.8], [0.6, 0.8], [0.0, 0.0]]
    np.testing.assert_allclose(grads, want, rtol=RANGE_RTOL)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_axis_name_rescue_sums_scaled_squares_across_shards(scale):
    x = scale * jax.random.normal(jax.random.key(1), (8, 3))
    tree = {"x": x}

    @functools.partial(
        jax.shard_map, mesh=_mesh(), in_specs=P("d"), out_specs=(P(), P())
    )
    def sharded(t):
        return _tree.global_norm(t, axis_name="d"), _tree.leaf_norms(t, axis_name="d")[
            "x"
        ]

    g, leaf = sharded(jax.device_put(tree, NamedSharding(_mesh(), P("d"))))
    ref = _ref(x)
    # 24 squares: (24 + 1) * 2**-24 / 2 + 2**-24 < 1e-6.
    np.testing.assert_allclose([float(g), float(leaf)], [ref, ref], rtol=RANGE_RTOL)


def test_all_finite_on_complex_parts_whose_modulus_overflows():
    z = jnp.array([3e38 + 3e38j], jnp.complex64)  # |z| = 4.2e38 > float32 max
    assert bool(_tree.all_finite([z]))
    assert not bool(_tree.all_finite([z, jnp.array([1j * jnp.inf], jnp.complex64)]))


# ------------------------------------------------ small leaves reduced together
def _mixed_tree(rng: np.random.Generator) -> dict[str, jax.Array]:
    big = _tree.SMALL_LEAF
    return {
        "big": jnp.asarray(rng.standard_normal(big), jnp.float32),
        "big2d": jnp.asarray(rng.standard_normal((2, big // 2 + 1)), jnp.float32),
        "bias": jnp.asarray(rng.standard_normal(7), jnp.float32),
        "bias2": jnp.asarray(rng.standard_normal(7), jnp.float32),
        "scale": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32),
        "scalar": jnp.float32(-2.5),
        "half": jnp.asarray(rng.integers(-15, 16, 9), jnp.bfloat16),
        "cplx": jnp.asarray(rng.standard_normal(4) + 1j, jnp.complex64),
        "empty": jnp.zeros((0, 3), jnp.float32),
    }


def test_reduction_groups_hold_every_element_once():
    tree = _mixed_tree(np.random.default_rng(0))
    groups = _tree.reduction_groups(tree)
    big = [x for x in jax.tree.leaves(tree) if x.size >= _tree.SMALL_LEAF]
    small = {(x.shape, x.dtype) for x in jax.tree.leaves(tree) if 0 < x.size < 4096}
    assert len(groups) == len(big) + len(small)  # one stack per shape and dtype
    for dtype in (jnp.float32, jnp.bfloat16, jnp.complex64):
        want = np.concatenate(
            [np.ravel(x) for x in jax.tree.leaves(tree) if x.dtype == dtype]
        )
        got = np.concatenate([np.ravel(g) for g in groups if g.dtype == dtype])
        np.testing.assert_array_equal(np.sort_complex(got), np.sort_complex(want))


def test_total_of_a_function_of_two_aligned_trees_matches_numpy():
    rng = np.random.default_rng(2)
    shapes = [(3, 5), (7,), (3, 5), (5000,), (7,), ()]
    a = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
    b = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
    got = _tree.total(a, lambda x, y: (x > y).astype(x.dtype) * y, b)
    want = sum(
        np.sum((np.asarray(x) > np.asarray(y)) * np.asarray(y)) for x, y in zip(a, b)
    )
    # A float32 sum of ~5.1K terms of |y| < 5 errs by well under 1e-2.
    np.testing.assert_allclose(float(got), want, atol=1e-2)


def test_norm_max_and_finiteness_over_small_and_large_leaves_match_numpy():
    tree = _mixed_tree(np.random.default_rng(1))
    flat = np.concatenate(
        [np.ravel(np.asarray(x).astype(np.complex128)) for x in tree.values()]
    )
    # float32 sums of ~8.3K squares: relative error below 8.3e3 * 2**-24 / 2.
    np.testing.assert_allclose(
        float(_tree.global_norm(tree)), np.linalg.norm(flat), rtol=3e-4
    )
    # A sum of float32 values in [-5, 5] (with ~8.3K terms) errs by < 1e-2.
    np.testing.assert_allclose(
        float(_tree.total(tree)), np.sum(flat.real + flat.imag), atol=1e-2
    )
    assert bool(_tree.all_finite(tree))
    for key in ("bias", "half", "cplx", "big2d"):  # a small or a large leaf
        for bad in (np.nan, np.inf):
            x = np.asarray(tree[key]).copy()
            x.flat[-1] = bad
            broken = {**tree, key: jnp.asarray(x)}
            assert not bool(_tree.all_finite(broken)), (key, bad)


@pytest.mark.parametrize("n", [5, 5000])  # 5000: past XLA:CPU's 4096 NaN loss
def test_extrema_match_numpy_and_keep_nan(n):
    v = np.linspace(-3.0, 7.0, n, dtype=np.float32)
    lo, hi = jax.jit(_tree.extrema)(v)
    assert (float(lo), float(hi)) == (-3.0, 7.0)
    for bad in (np.nan, np.inf):
        w = v.copy()
        w[n // 2] = bad
        lo, hi = jax.jit(_tree.extrema)(w)
        np.testing.assert_array_equal([lo, hi], [np.min(w), np.max(w)])


def test_eager_norms_compile_once():
    # The rescue conds' branches are built once, so an un-jitted call on a tree
    # seen before reuses JAX's caches (a branch made anew per call compiled
    # anew per call: ~50 ms each on CPU).
    compiles = []

    class Record(logging.Handler):
        def emit(self, record):
            if "Compiling" in record.getMessage():
                compiles.append(record.getMessage())

    tree = {"a": jnp.ones(3), "b": jnp.full((2, 2), 1e30)}  # b takes the rescue
    for fn in (_tree.global_norm, _tree.leaf_norms, _tree.leaf_norm_vector):
        fn(tree)
    handler = Record()
    logging.getLogger("jax").addHandler(handler)
    try:
        with jax.log_compiles():
            norm = _tree.global_norm(tree)
            leaf = _tree.leaf_norms(tree)
            vector = _tree.leaf_norm_vector(tree)
    finally:
        logging.getLogger("jax").removeHandler(handler)
    assert compiles == []
    np.testing.assert_allclose(norm, 2e30, rtol=1e-6)
    np.testing.assert_allclose(leaf["b"], 2e30, rtol=1e-6)
    np.testing.assert_allclose(vector, [np.sqrt(3), 2e30], rtol=1e-6)
