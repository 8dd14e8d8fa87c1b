"""The ring buffer against a Python deque, and its sharding-preserving init."""

from __future__ import annotations

import collections

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_stab import _ring

WINDOW = 4
_PUSH = jax.jit(_ring.push)


@hypothesis.given(
    pushes=st.lists(
        st.tuples(st.floats(-1e6, 1e6, width=32), st.booleans()),
        min_size=1,
        max_size=12,
    )
)
def test_push_lags_and_valid_match_a_deque(pushes):
    ring = _ring.init({"a": jnp.zeros(2)}, WINDOW)
    window = collections.deque(maxlen=WINDOW)
    for value, keep in pushes:
        ring = _PUSH(ring, {"a": jnp.full(2, value, jnp.float32)}, keep)
        if keep:
            window.appendleft(value)  # index 0 = newest = lag 0
    assert int(ring.filled) == len(window)
    lags, ok = np.asarray(_ring.lags(ring)), np.asarray(_ring.valid(ring))
    assert ok.sum() == len(window)
    for slot in range(WINDOW):
        if ok[slot]:
            assert float(ring.values["a"][slot, 0]) == window[lags[slot]]
    mean, std = _ring.masked_mean_std(
        _ring.RingBuffer(ring.values["a"][:, 0], ring.index, ring.filled)
    )
    if window:
        np.testing.assert_allclose(float(mean), np.mean(window), rtol=1e-5, atol=1e-2)
        np.testing.assert_allclose(float(std), np.std(window), rtol=1e-4, atol=1e-1)


def test_scalar_ring_and_dtype():
    ring = _ring.init_scalar(3, jnp.float32)
    assert ring.values.shape == (3,)
    ring = _ring.init({"a": jnp.zeros((2, 3))}, 5, jnp.bfloat16)
    assert ring.values["a"].shape == (5, 2, 3)
    assert ring.values["a"].dtype == jnp.bfloat16
    ring = _ring.push(ring, {"a": jnp.ones((2, 3), jnp.float32)})
    assert ring.values["a"].dtype == jnp.bfloat16


def test_init_keeps_parameter_sharding_under_explicit_mesh():
    mesh = jax.make_mesh((8,), ("x",))
    with jax.set_mesh(mesh):
        p = jax.device_put(jnp.ones((16, 3)), NamedSharding(mesh, P("x", None)))
        ring = jax.jit(lambda q: _ring.init(q, 3))(p)
        assert ring.values.sharding.spec == P(None, "x", None)
        ring = jax.jit(_ring.push)(ring, p)
        assert ring.values.sharding.spec == P(None, "x", None)
