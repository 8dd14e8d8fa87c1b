"""Temporal filters against NumPy references, hypothesis properties, bad arguments."""

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
from optax_stab import _median, _ring

STEPS = 30
NAN = float("nan")
SHAPE = (3, 5)


# ----------------------------------------------------------- NumPy references
def ref_fir(seq: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Causal FIR, renormalised over the available lags."""
    out = []
    for t in range(len(seq)):
        n = min(t + 1, len(weights))
        w = weights[:n]
        hist = seq[t - np.arange(n)]  # lag k -> seq[t - k]
        out.append(np.tensordot(w, hist, axes=1) / w.sum())
    return np.stack(out)


def ref_median(seq: np.ndarray, window: int) -> np.ndarray:
    return np.stack(
        [
            np.median(seq[max(0, t - window + 1) : t + 1], axis=0)
            for t in range(len(seq))
        ]
    )


def ref_ema(seq: np.ndarray, decay: float, debias: bool) -> np.ndarray:
    m, out = np.zeros_like(seq[0]), []
    for t, g in enumerate(seq, start=1):
        m = decay * m + (1 - decay) * g
        out.append(m / (1 - decay**t) if debias else m)
    return np.stack(out)


def gaussian_lag_weights(window: int, sigma: float) -> np.ndarray:
    k = np.arange(window)
    return np.exp(-(k**2) / (2 * sigma**2))


@functools.cache
def _sequence(dtype: str) -> np.ndarray:
    g = jax.random.normal(jax.random.key(42), (STEPS, *SHAPE)) * 3.0
    return np.asarray(g.astype(dtype))


def _run(tx, seq: np.ndarray) -> np.ndarray:
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(SHAPE, seq.dtype))
    out = []
    for g in seq:
        u, state = update(jnp.asarray(g), state)
        assert u.dtype == seq.dtype
        out.append(np.asarray(u, np.float64))
    return np.stack(out)


def _tol(dtype: str) -> dict:
    # bf16 outputs are rounded once to 8 bits of mantissa (relative 2**-8).
    return (
        {"rtol": 1e-5, "atol": 1e-5}
        if dtype == "float32"
        else {"rtol": 8e-3, "atol": 2e-2}
    )


CASES = []
for _w in (1, 2, 4, 5):
    CASES += [
        (f"moving_average_w{_w}", lambda w=_w: optax_stab.moving_average(w),
         lambda s, w=_w: ref_fir(s, np.ones(w))),
        (f"gaussian_w{_w}", lambda w=_w: optax_stab.gaussian_smoothing(w),
         lambda s, w=_w: ref_fir(s, gaussian_lag_weights(w, w / 2))),
        (f"median_w{_w}", lambda w=_w: optax_stab.windowed_median(w),
         lambda s, w=_w: ref_median(s, w)),
    ]  # fmt: skip
CASES += [
    ("median_w9", lambda: optax_stab.windowed_median(9), lambda s: ref_median(s, 9)),
    ("fir_3_-1_2", lambda: optax_stab.fir_smoothing([3.0, -1.0, 2.0]),
     lambda s: ref_fir(s, np.array([3.0, -1.0, 2.0]))),
    ("gaussian_w6_sigma1", lambda: optax_stab.gaussian_smoothing(6, sigma=1.0),
     lambda s: ref_fir(s, gaussian_lag_weights(6, 1.0))),
    ("ema_0.8", lambda: optax_stab.ema_smoothing(0.8), lambda s: ref_ema(s, 0.8, True)),
    ("ema_0.8_biased", lambda: optax_stab.ema_smoothing(0.8, debias=False),
     lambda s: ref_ema(s, 0.8, False)),
]  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("name", "make", "ref"), CASES, ids=[c[0] for c in CASES])
def test_filter_matches_numpy_reference_including_warmup(name, make, ref, dtype):
    seq = _sequence(dtype)
    got = _run(make(), seq)
    expected = ref(seq.astype(np.float64))
    np.testing.assert_allclose(got, expected, **_tol(dtype))
    # Step 1 returns the gradient itself (except the biased EMA).
    if not name.endswith("biased"):
        np.testing.assert_allclose(got[0], seq[0].astype(np.float64), **_tol(dtype))


@pytest.mark.parametrize("window", [3, 4])
def test_bf16_accumulator_halves_memory_and_tracks_f32(window):
    seq = _sequence("float32")
    tx = optax_stab.windowed_median(window, accumulator_dtype=jnp.bfloat16)
    state = tx.init(jnp.zeros(SHAPE))
    f32_bytes = window * np.prod(SHAPE) * 4
    assert state.ring.values.nbytes == f32_bytes // 2
    got = _run(tx, seq)
    np.testing.assert_allclose(
        got, ref_median(seq.astype(np.float64), window), **_tol("bfloat16")
    )


@pytest.mark.parametrize("window", range(1, _median.MAX_WINDOW + 1))
def test_selection_network_gives_middle_order_statistics(window):
    x = np.asarray(jax.random.normal(jax.random.key(window), (window, 64)))
    lo, hi = _median.middle_pair([x[i] for i in range(window)])
    s = np.sort(x, axis=0)
    m = (window - 1) // 2
    np.testing.assert_array_equal(lo, s[m])
    np.testing.assert_array_equal(hi, s[min(m + 1, window - 1)])


def test_sorting_network_sorts_every_binary_input():
    # 0-1 principle: a comparator network sorts everything iff it sorts 0/1 inputs.
    for n in range(1, 13):
        bits = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).T
        wires = [bits[i].copy() for i in range(n)]
        for a, b in _median.batcher_network(n):
            wires[a], wires[b] = (
                np.minimum(wires[a], wires[b]),
                np.maximum(wires[a], wires[b]),
            )
        np.testing.assert_array_equal(np.stack(wires), np.sort(bits, axis=0))


MEDIAN5 = optax_stab.windowed_median(5)
MEDIAN5_UPDATE = jax.jit(MEDIAN5.update)
MA4 = optax_stab.moving_average(4)
MA4_UPDATE = jax.jit(MA4.update)


@functools.partial(jax.jit, static_argnums=0)
def _gaussian_slot_weights(window, sigma, index, filled):
    # Jitted, one compile per window: op-by-op dispatch of each example is
    # slower than the compile.
    ring = _ring.RingBuffer(jnp.zeros((window,)), index, filled)
    return _ring.slot_weights(ring, optax_stab._fir.gaussian_weights(window, sigma))


class SmoothingPropertiesTest(chex.TestCase):
    @hypothesis.given(c=st.floats(-1e30, 1e30), steps=st.integers(1, 8))
    def test_median_and_mean_of_constant_sequence_is_that_constant(self, c, steps):
        g = jnp.full((4,), c, jnp.float32)
        sm, sa = MEDIAN5.init(g), MA4.init(g)
        for _ in range(steps):
            um, sm = MEDIAN5_UPDATE(g, sm)
            ua, sa = MA4_UPDATE(g, sa)
        np.testing.assert_array_equal(um, g)
        np.testing.assert_allclose(ua, g, rtol=1e-6)

    @hypothesis.given(
        others=st.lists(st.floats(-100, 100, width=32), min_size=4, max_size=4),
        spike=st.floats(-3e38, 3e38),
        position=st.integers(0, 4),
    )
    def test_single_spike_in_window_of_five_stays_within_the_others(
        self, others, spike, position
    ):
        values = list(others)
        values.insert(position, spike)
        state = MEDIAN5.init(jnp.zeros(1))
        for v in values:
            u, state = MEDIAN5_UPDATE(jnp.array([v], jnp.float32), state)
        assert min(others) <= float(u[0]) <= max(others)

    @hypothesis.given(seed=st.integers(0, 2**16))
    def test_amplify_slow_with_zero_strength_is_identity(self, seed):
        tx = optax_stab.amplify_slow(0.0, optax_stab.moving_average(3))
        g = jax.random.normal(jax.random.key(seed), (3, 4, 2))
        state = tx.init(g[0])
        for i in range(3):
            u, state = tx.update(g[i], state)
            np.testing.assert_array_equal(u, g[i])

    @hypothesis.given(
        window=st.integers(1, 12),
        sigma=st.floats(0.1, 50.0),
        filled=st.integers(1, 12),
        index=st.integers(0, 11),
    )
    def test_gaussian_weights_sum_to_one_over_available_lags(
        self, window, sigma, filled, index
    ):
        w = _gaussian_slot_weights(
            window,
            jnp.float32(sigma),
            jnp.int32(index % window),
            jnp.int32(min(filled, window)),
        )
        np.testing.assert_allclose(float(jnp.sum(w)), 1.0, rtol=1e-6)
        assert np.count_nonzero(np.asarray(w) > 0) <= min(filled, window)


def test_nonfinite_step_passes_through_and_is_not_stored():
    tx = optax_stab.windowed_median(3)
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(2))
    for v in (1.0, 2.0):
        _, state = update(jnp.full(2, v), state)
    bad = jnp.array([jnp.nan, 5.0])
    u, state2 = update(bad, state)
    np.testing.assert_array_equal(np.isnan(u), [True, False])
    chex.assert_trees_all_equal(state2, state)
    u, _ = update(jnp.full(2, 3.0), state2)
    np.testing.assert_array_equal(u, [2.0, 2.0])


def test_moving_average_running_sum_does_not_drift():
    # A plain running sum S += g_t - g_{t-W} carries every rounding since step 1:
    # on gradients near 3, after 20000 steps its error is ~1e-5 of the mean.
    # The block sum that replaces S every W steps keeps it at a few ulps.
    window, steps = 8, 20_000
    tx = optax_stab.moving_average(window)
    seq = 3.0 + jax.random.normal(jax.random.key(0), (steps, 256), jnp.float32)

    def step(state, g):
        u, state = tx.update(g, state)
        return state, u

    _, out = jax.lax.scan(step, tx.init(seq[0]), seq)
    x = np.asarray(seq[-1000 - window + 1 :], np.float64)
    ref = np.stack([x[i : i + window].mean(0) for i in range(1000)])
    rel = np.abs(np.asarray(out[-1000:], np.float64) - ref) / np.abs(ref)
    assert rel.max() < 1e-6, rel.max()


class BadHyperparametersTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("ema_decay_one", optax_stab.ema_smoothing, {"decay": 1.0}, "decay"),
        ("ema_negative_decay", optax_stab.ema_smoothing, {"decay": -0.1}, "decay"),
        ("ema_nan_decay", optax_stab.ema_smoothing, {"decay": NAN}, "decay"),
        ("ma_window_zero", optax_stab.moving_average, {"window": 0}, "window"),
        ("ma_window_float", optax_stab.moving_average, {"window": 2.5}, "window"),
        ("ma_window_bool", optax_stab.moving_average, {"window": True}, "window"),
        ("gauss_sigma_zero", optax_stab.gaussian_smoothing, {"sigma": 0.0}, "sigma"),
        ("gauss_sigma_nan", optax_stab.gaussian_smoothing, {"sigma": NAN}, "sigma"),
        ("fir_sum_zero", optax_stab.fir_smoothing, {"weights": [1.0, -1.0]}, "weights"),
        ("fir_empty", optax_stab.fir_smoothing, {"weights": []}, "weights"),
        ("fir_nan", optax_stab.fir_smoothing, {"weights": [1.0, NAN]}, "weights"),
        ("fir_2d", optax_stab.fir_smoothing, {"weights": [[1.0]]}, "weights"),
        ("median_window_zero", optax_stab.windowed_median, {"window": 0}, "window"),
        ("median_window_33", optax_stab.windowed_median, {"window": 33}, "window"),
        ("amplify_negative", optax_stab.amplify_slow, {"strength": -1.0}, "strength"),
    )  # fmt: skip
    def test_rejects_bad_hyperparameters(self, factory, kwargs, name):
        with self.assertRaisesRegex(ValueError, f"`{name}`.*got"):
            factory(**kwargs)
