"""Guards against NumPy references and plain optax runs; loss passing in Flax."""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import optax_stab
from tests import _examples, _shard

STEPS = 100
SPIKE_AT = 60
NAN, INF = float("nan"), float("inf")


def _params():
    return {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}


@functools.cache
def _stream(seed: int = 0):
    """``STEPS`` gradients ~ N(0, 1) (norm ~ 3.8) and a slowly decaying loss."""
    rng = np.random.default_rng(seed)
    grads = {
        "w": rng.standard_normal((STEPS, 4, 3)).astype(np.float32),
        "b": rng.standard_normal((STEPS, 3)).astype(np.float32),
    }
    t = np.arange(STEPS, dtype=np.float32)
    losses = (2.0 * np.exp(-t / 50) + 0.01 * rng.standard_normal(STEPS)).astype(
        np.float32
    )
    return grads, losses


def _spiked(factor=1000.0, loss_value=None):
    grads, losses = _stream()
    grads = {k: v.copy() for k, v in grads.items()}
    losses = losses.copy()
    for k in grads:
        grads[k][SPIKE_AT] *= factor
    if loss_value is not None:
        losses[SPIKE_AT] = loss_value
    return grads, losses


def _norms(grads):
    return np.sqrt(
        sum(np.sum(np.square(g), axis=tuple(range(1, g.ndim))) for g in grads.values())
    )


def _at(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def _scan(tx, grads, losses):
    """Runs ``tx`` over a stream; returns every update and every state."""
    params = _params()

    def step(state, xs):
        g, loss = xs
        u, state = tx.update(g, state, params, loss=loss)
        return state, (u, state)

    _, (updates, states) = jax.lax.scan(step, tx.init(params), (grads, losses))
    return updates, states


@functools.cache
def _runner(tx):
    return jax.jit(functools.partial(_scan, tx))


ADAM = optax.adam(1e-2)
SKIP = optax_stab.spike_guard(ADAM)  # the defaults: window 128, z 6, warm-up 20


class SpikeGuardStreamTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("grad_spike", 1000.0, None, 0),
        ("nan_loss", 1.0, NAN, 1),
        ("loss_spike", 1.0, 1000.0, 0),
    )
    def test_spike_is_skipped_once_and_adam_state_is_kept(
        self, factor, loss_value, nonfinite
    ):
        grads, losses = _spiked(factor, loss_value)
        updates, states = _runner(SKIP)(grads, losses)
        spikes = np.asarray(states.spike_steps)
        np.testing.assert_array_equal(spikes, (np.arange(STEPS) >= SPIKE_AT) * 1)
        self.assertEqual(int(states.nonfinite_steps[-1]), nonfinite)
        chex.assert_trees_all_equal(
            _at(states.inner_state, SPIKE_AT), _at(states.inner_state, SPIKE_AT - 1)
        )
        u = _at(updates, SPIKE_AT)
        chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, u))
        # Reference: plain Adam on the stream without the spiked step.
        keep = np.arange(STEPS) != SPIKE_AT
        ref_updates, ref_states = _runner(optax.with_extra_args_support(ADAM))(
            jax.tree.map(lambda x: x[keep], grads), losses[keep]
        )
        # Two different compiled programs round differently: atol is about ten
        # float32 ulps at the updates' scale (lr = 1e-2, ulp ~1e-9), for the
        # elements near zero where rtol alone asks for more than float32 has;
        # taking the spiked step would change updates by ~1e-2.
        chex.assert_trees_all_close(
            jax.tree.map(lambda x: x[keep], updates), ref_updates, rtol=1e-6, atol=1e-8
        )
        chex.assert_trees_all_close(
            _at(states.inner_state, -1), _at(ref_states, -1), rtol=1e-6
        )

    @parameterized.named_parameters(
        ("grad_norm_ignores_loss_spike", "grad_norm", 1.0, 1000.0, 0),
        ("loss_ignores_norm_spike", "loss", 1000.0, None, 0),
        ("loss_still_skips_nan_loss", "grad_norm", 1.0, NAN, 1),
    )
    def test_watch_selects_the_watched_values(self, watch, factor, loss_value, n):
        tx = optax_stab.spike_guard(ADAM, watch=watch)
        _, states = _runner(tx)(*_spiked(factor, loss_value))
        self.assertEqual(int(states.spike_steps[-1]), n)

    def test_without_loss_only_the_norm_is_watched(self):
        tx = optax_stab.spike_guard(optax.sgd(1.0), window=8, warmup_steps=3)
        state = tx.init(jnp.zeros(2))
        for g in ([1.0, 1.0], [2.0, 2.0], [1.0, 1.0]):
            _, state = tx.update(jnp.asarray(g), state)
        self.assertEqual(int(state.loss_history.filled), 0)
        u, state = tx.update(jnp.asarray([1e3, 1e3]), state)
        np.testing.assert_array_equal(u, [0.0, 0.0])
        loss_only = optax_stab.spike_guard(optax.sgd(1.0), watch="loss")
        u, s = loss_only.update(jnp.asarray([1.0, NAN]), loss_only.init(jnp.zeros(2)))
        np.testing.assert_array_equal(u, [0.0, 0.0])
        self.assertEqual(int(s.nonfinite_steps), 1)

    def test_rescale_scales_the_norm_to_the_threshold(self):
        window, z = 16, 6.0
        tx = optax_stab.spike_guard(
            optax.identity(), window=window, z_threshold=z, action="rescale"
        )
        grads, losses = _spiked(1000.0)
        updates, states = _runner(tx)(grads, losses)
        past = _norms(grads)[SPIKE_AT - window : SPIKE_AT].astype(np.float64)
        threshold = past.mean() + z * past.std()  # population std
        out = _norms(jax.tree.map(np.asarray, updates))
        np.testing.assert_allclose(out[SPIKE_AT], threshold, rtol=1e-5)
        keep = np.arange(STEPS) != SPIKE_AT
        chex.assert_trees_all_equal(
            jax.tree.map(lambda x: np.asarray(x)[keep], updates),
            jax.tree.map(lambda x: x[keep], grads),
        )
        self.assertEqual(int(states.spike_steps[-1]), 1)
        # The spike (the first of its run) entered the history clipped to the
        # threshold.
        ring = _at(states.norm_history, SPIKE_AT)
        newest = (int(ring.index) - 1) % window
        np.testing.assert_allclose(ring.values[newest], threshold, rtol=1e-5)

    def test_reset_reinitialises_the_inner_state_before_the_step(self):
        tx = optax_stab.spike_guard(ADAM, action="reset")
        grads, losses = _spiked(1000.0)
        updates, states = _runner(tx)(grads, losses)
        params = _params()
        ref_u, ref_state = ADAM.update(_at(grads, SPIKE_AT), ADAM.init(params), params)
        chex.assert_trees_all_close(_at(updates, SPIKE_AT), ref_u, rtol=1e-6)
        chex.assert_trees_all_close(
            _at(states.inner_state, SPIKE_AT), ref_state, rtol=1e-6
        )
        self.assertEqual(int(states.spike_steps[-1]), 1)
        self.assertEqual(int(_at(states.inner_state, -1)[0].count), STEPS - SPIKE_AT)

    def test_vmap_over_z_threshold_matches_separate_runs(self):
        grads, losses = _stream(1)
        grads = {k: v.copy() for k, v in grads.items()}
        for t, f in ((30, 1.6), (45, 2.5), (70, 4.0), (85, 10.0)):
            for k in grads:
                grads[k][t] *= f

        def run(z):
            tx = optax_stab.spike_guard(ADAM, window=32, z_threshold=z)
            return _scan(tx, grads, losses)

        zs = jnp.asarray([0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 10.0, 100.0])
        swept = jax.jit(jax.vmap(run))(zs)
        single = jax.jit(run)
        counts = []
        for i, z in enumerate(zs):
            expected = single(z)
            chex.assert_trees_all_close(_at(swept, i), expected, rtol=1e-6, atol=1e-7)
            counts.append(int(expected[1].spike_steps[-1]))
        self.assertEqual(counts, sorted(counts, reverse=True))
        self.assertGreater(len(set(counts)), 3)

    @parameterized.named_parameters(
        ("window_one", {"window": 1}, "window"),
        ("window_float", {"window": 8.0}, "window"),
        ("z_zero", {"z_threshold": 0.0}, "z_threshold"),
        ("z_nan", {"z_threshold": NAN}, "z_threshold"),
        ("warmup_negative", {"warmup_steps": -1}, "warmup_steps"),
        ("max_consecutive_negative", {"max_consecutive": -1}, "max_consecutive"),
        ("max_consecutive_float", {"max_consecutive": 2.5}, "max_consecutive"),
        ("min_relative_negative", {"min_relative": -0.1}, "min_relative"),
        ("min_relative_nan", {"min_relative": NAN}, "min_relative"),
        ("action", {"action": "clip"}, "action"),
        ("watch", {"watch": "params"}, "watch"),
    )
    def test_rejects_bad_hyperparameters(self, kwargs, name):
        with self.assertRaisesRegex(ValueError, f"`{name}`.*got"):
            optax_stab.spike_guard(optax.sgd(0.1), **kwargs)

    def test_rejects_a_non_scalar_loss(self):
        tx = optax_stab.spike_guard(optax.sgd(0.1))
        with self.assertRaisesRegex(ValueError, "`loss`.*scalar"):
            tx.update(jnp.ones(2), tx.init(jnp.ones(2)), loss=jnp.ones(3))


def _constant_then(after, *, before=1.0, steps=200, shift_at=150):
    """Gradients ``before * ones`` up to ``shift_at``, then ``after(k) * ones``."""
    k = np.arange(steps) - shift_at
    scale = np.where(k < 0, before, [after(int(i)) for i in k]).astype(np.float32)
    return {"w": np.ones((steps, 4, 3), np.float32) * scale[:, None, None]}, scale


def _applied(updates):
    return np.asarray(_norms(jax.tree.map(np.asarray, updates))) > 0


@pytest.mark.parametrize(
    ("window", "z"), [(128, 6.0), (64, 3.0), (32, 2.5), (128, 2.0)]
)
def test_lasting_level_shift_costs_one_plus_window_over_1_z2_skips(window, z):
    # The first shifted value is skipped and enters the history clipped to
    # the threshold. Against a full history with k more values at the new
    # level, a value at that level has z ~ sqrt((window - k) / k): it is
    # skipped while k < window / (1 + z^2), then the new level is normal.
    expected = 1 + math.ceil(window / (1 + z**2))
    grads, _ = _constant_then(lambda k: 10.0, shift_at=window + 20)
    tx = optax_stab.spike_guard(
        optax.sgd(1.0), window=window, z_threshold=z, max_consecutive=None
    )
    params = {"w": jnp.zeros((4, 3))}

    def step(state, g):
        u, state = tx.update(g, state, params)
        return state, (u, state)

    _, (updates, states) = jax.jit(lambda g: jax.lax.scan(step, tx.init(params), g))(
        grads
    )
    applied = _applied(updates)
    shift = window + 20
    assert applied[:shift].all()
    np.testing.assert_array_equal(applied[shift : shift + expected], False)
    assert applied[shift + expected :].all()
    assert int(states.spike_steps[-1]) == expected
    assert int(np.max(states.consecutive_spikes)) == expected


def _growing_run(tx, steps=200, shift_at=150):
    """Runs ``tx`` where the gradient doubles every step after ``shift_at``."""
    grads, _ = _constant_then(lambda k: 2.0 ** (k + 4), steps=steps, shift_at=shift_at)
    return _runner(tx)(grads, np.ones(steps, np.float32))


@pytest.mark.parametrize("action", ["skip", "rescale", "reset"])
def test_max_consecutive_bounds_the_run_of_acted_on_steps(action):
    # A norm that doubles every step is a spike at every step, for good: the
    # guard acts on 3 steps in a row, applies the 4th unchanged, and so on.
    tx = optax_stab.spike_guard(
        optax.sgd(1.0), window=32, max_consecutive=3, action=action
    )
    updates, states = _growing_run(tx, steps=190)
    acted = np.diff(np.asarray(states.spike_steps), prepend=0) > 0
    np.testing.assert_array_equal(acted[:150], False)
    np.testing.assert_array_equal(acted[150:], [1, 1, 1, 0] * 10)
    assert int(np.max(states.consecutive_spikes)) == 3
    assert int(states.applied_spike_steps[-1]) == 10
    assert int(states.accepted_steps[-1]) + int(states.spike_steps[-1]) == 190
    if action == "skip":
        np.testing.assert_array_equal(_applied(updates), ~acted)


def test_default_bound_is_8_and_none_acts_on_every_spike():
    default = optax_stab.spike_guard(optax.sgd(1.0))
    unbounded = optax_stab.spike_guard(optax.sgd(1.0), max_consecutive=None)
    skipped = ~_applied(_growing_run(default)[0])[150:]
    np.testing.assert_array_equal(skipped[:18], ([1] * 8 + [0]) * 2)
    assert (~_applied(_growing_run(unbounded)[0])[150:]).all()  # the documented risk


@pytest.mark.parametrize(
    ("min_relative", "loss", "spike"),
    [(0.1, 1.05, False), (0.1, 1.2, True), (0.0, 1.05, True), (0.5, 1.2, False)],
)
def test_min_relative_keeps_small_rises_of_a_smooth_loss(min_relative, loss, spike):
    # Loss 1 +- 0.001: a rise to 1.05 has z of about 50 but is only 5% above
    # the mean, below the default min_relative of 10%.
    rng = np.random.default_rng(0)
    losses = (1.0 + 0.001 * rng.standard_normal(60)).astype(np.float32)
    losses[50] = loss
    grads = {"w": np.ones((60, 4, 3), np.float32)}
    tx = optax_stab.spike_guard(
        optax.sgd(1.0), window=32, min_relative=min_relative, watch="loss"
    )
    _, states = _runner(tx)(grads, losses)
    assert float(states.loss_z[50]) > 20
    assert int(states.spike_steps[-1]) == int(spike)


@pytest.mark.parametrize(
    "tx",
    [
        optax_stab.spike_guard(ADAM, action="skip"),
        optax_stab.spike_guard(ADAM, action="rescale"),
        optax_stab.spike_guard(ADAM, action="reset"),
        optax_stab.guard_nonfinite(ADAM, max_consecutive=2),
    ],
    ids=["skip", "rescale", "reset", "nonfinite"],
)
def test_update_has_no_callback_and_no_cond_around_state_or_updates(tx):
    # The guard's decision is a select; the only conds allowed are the norm
    # helper's rescue of an over- or underflowing sum of squares (_tree's
    # module note), whose outputs are scalars, and lax.platform_dependent's
    # choice of the CPU-only barrier before a norm's squares, which lowering
    # for one platform resolves (no cond is left in the compiled step).
    params = _params()
    closed = jax.make_jaxpr(
        lambda g, s: tx.update(g, s, params, loss=jnp.float32(1.0))
    )(params, tx.init(params))
    text = str(closed)
    for primitive in ("callback", "while"):
        assert primitive not in text

    def conds(jaxpr):
        platform_indices = []
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "platform_index":
                platform_indices += eqn.outvars
            index = eqn.invars[0] if eqn.invars else None
            dispatch = eqn.params.get("branches_platforms") is not None or any(
                index is v for v in platform_indices
            )
            if eqn.primitive.name == "cond" and not dispatch:
                yield eqn
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple) else (value,):
                    sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                    if hasattr(sub, "eqns"):
                        yield from conds(sub)

    for eqn in conds(closed.jaxpr):
        assert all(v.aval.shape == () for v in eqn.outvars), eqn


# ------------------------------------------------------------ guard_nonfinite
def _bad(kind):
    g = {"w": jnp.full((2, 2), 0.5), "b": jnp.ones(2)}
    if kind == "nan_loss":
        return g, NAN
    value = {"nan": NAN, "pos_inf": INF, "neg_inf": -INF}[kind]
    return {"w": g["w"].at[1, 0].set(value), "b": g["b"]}, 1.0


MOMENTUM = optax.sgd(0.1, momentum=0.9)


class GuardNonfiniteTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("nan_in_one_leaf", "nan"),
        ("pos_inf", "pos_inf"),
        ("neg_inf", "neg_inf"),
        ("nan_loss_finite_grads", "nan_loss"),
    )
    def test_bad_step_is_skipped_and_counted(self, kind):
        tx = optax_stab.guard_nonfinite(MOMENTUM)
        update = self.variant(tx.update)
        params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
        good = {"w": jnp.full((2, 2), 0.25), "b": jnp.full(2, -1.0)}
        _, state = update(good, tx.init(params), params, loss=1.0)
        bad, loss = _bad(kind)
        u, new = update(bad, state, params, loss=loss)
        chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, good))
        chex.assert_trees_all_equal(new.inner_state, state.inner_state)
        self.assertEqual(int(new.nonfinite_steps), 1)
        self.assertEqual(int(new.consecutive_nonfinite), 1)
        # The next good step continues SGD-with-momentum as if nothing happened:
        # trace = 0.9 * g + g, update = -0.1 * trace.
        u, new = update(good, new, params, loss=1.0)
        chex.assert_trees_all_close(u, jax.tree.map(lambda g: -0.19 * g, good))
        self.assertEqual(int(new.consecutive_nonfinite), 0)
        self.assertEqual(int(new.nonfinite_steps), 1)

    def test_max_consecutive_applies_anyway_and_resets(self):
        tx = optax_stab.guard_nonfinite(optax.sgd(1.0), max_consecutive=2)
        update = jax.jit(tx.update)
        state = tx.init(jnp.zeros(1))
        pattern = [0, 1, 1, 1, 1, 0, 1, 1]  # 1 = a NaN gradient
        outs, counters = [], []
        for bad in pattern:
            u, state = update(jnp.asarray([NAN if bad else 2.0]), state)
            outs.append(float(u[0]))
            counters.append(
                (
                    int(state.nonfinite_steps),
                    int(state.consecutive_nonfinite),
                    int(state.applied_nonfinite_steps),
                )
            )
        # At most 2 bad steps in a row are skipped; the next one is applied
        # and starts a new run (the meaning max_consecutive has in spike_guard).
        np.testing.assert_array_equal(outs, [-2.0, 0, 0, NAN, 0, -2.0, 0, 0])
        self.assertEqual(
            counters,
            [
                (0, 0, 0),
                (1, 1, 0),
                (2, 2, 0),
                (3, 0, 1),
                (4, 1, 1),
                (4, 0, 1),
                (5, 1, 1),
                (6, 2, 1),
            ],
        )

    def test_max_consecutive_zero_applies_every_step_but_counts(self):
        tx = optax_stab.guard_nonfinite(optax.sgd(1.0), max_consecutive=0)
        u, state = tx.update(jnp.asarray([INF]), tx.init(jnp.zeros(1)))
        self.assertEqual(float(u[0]), -INF)
        self.assertEqual(int(state.applied_nonfinite_steps), 1)

    def test_bfloat16_update_stays_bfloat16(self):
        tx = optax_stab.guard_nonfinite(optax.sgd(0.1))
        g = jnp.asarray([1.0, NAN], jnp.bfloat16)
        u, _ = tx.update(g, tx.init(g))
        self.assertEqual(u.dtype, jnp.bfloat16)
        np.testing.assert_array_equal(u.astype(jnp.float32), [0.0, 0.0])

    @parameterized.named_parameters(
        ("negative", -1),
        ("float", 2.5),
    )
    def test_rejects_bad_max_consecutive(self, value):
        with self.assertRaisesRegex(ValueError, "`max_consecutive`.*got"):
            optax_stab.guard_nonfinite(optax.sgd(0.1), max_consecutive=value)


# ---------------------------------------------------------------- extra args
def _needs_loss():
    """An inner transform that multiplies the updates by ``loss * scale``."""

    def update_fn(updates, state, params=None, *, loss, scale=1.0):
        del params
        return jax.tree.map(lambda u: u * loss * scale, updates), state

    return optax.GradientTransformationExtraArgs(
        lambda p: optax.EmptyState(), update_fn
    )


@pytest.mark.parametrize(
    "guard",
    [
        optax_stab.guard_nonfinite,
        functools.partial(optax_stab.spike_guard, action="rescale"),
        functools.partial(optax_stab.spike_guard, action="reset"),
    ],
    ids=["nonfinite", "spike_rescale", "spike_reset"],
)
def test_extra_args_reach_inner_through_a_chain(guard):
    tx = optax.chain(guard(_needs_loss()), optax.scale(-1.0))
    u, _ = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), loss=3.0, scale=0.5)
    np.testing.assert_allclose(u, [-1.5, -1.5])


# --------------------------------------------------- passing loss= from Flax
def test_nnx_optimizer_update_forwards_loss():
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    tx = optax_stab.spike_guard(optax.sgd(0.1), window=4, warmup_steps=2)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.ones((4, 3))

    def loss_fn(m):
        return jnp.mean(m(x) ** 2)

    for _ in range(2):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads, loss=loss)
    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, loss=jnp.nan * loss)  # finite grads, NaN loss
    chex.assert_trees_all_equal(nnx.state(model, nnx.Param), before)
    report = optax_stab.health_report(optimizer)
    assert report["nonfinite_steps"] == 1.0
    assert report["spike_steps"] == 1.0
    assert optimizer.opt_state.loss_history.filled.get_value() == 2


def test_linen_train_state_pattern_passes_loss():
    from flax.training import train_state

    tx = optax_stab.guard_nonfinite(optax.sgd(0.1))
    params = {"w": jnp.ones(2)}
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
    grads = {"w": jnp.ones(2)}

    # apply_gradients forwards no extra args: the loss never reaches the guard.
    dropped = state.apply_gradients(grads=grads)
    assert int(dropped.opt_state.nonfinite_steps) == 0

    # The documented pattern (optax_stab._guards module docstring).
    loss = jnp.float32(jnp.nan)
    updates, opt_state = state.tx.update(
        grads, state.opt_state, state.params, loss=loss
    )
    state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
    )
    chex.assert_trees_all_equal(state.params, params)
    assert int(state.opt_state.nonfinite_steps) == 1
    assert int(state.step) == 1
    assert optax_stab.health_report(state)["nonfinite_steps"] == 1.0


# -------------------------------------------------------------------- example
def test_nnx_guarded_training_example_quick():
    example = _examples.load_example("nnx_guarded_training")
    out = example.main(["--quick"])
    at = out["corrupt_at"]
    # The corrupted batch is counted once, flagged by the report, and skipped.
    assert out["spike_steps"] == 1.0
    assert out["nonfinite_steps"] == 0.0
    assert out["reports"][at]["spike_steps"] == 1.0
    assert out["reports"][at]["exploding"] == 1.0
    assert out["reports"][at - 20]["spike_steps"] == 0.0
    # Training continues: clean losses after it stay at the level before it
    # (the skipped step left the params as they were, so only minibatch noise
    # differs: 1.26x here vs the 2x bound), end below the start (2x margin
    # here) and below the unguarded run's, which applied the 1e5x-loss step
    # (7.6x margin here).
    assert out["losses"][at] > 1e3 * out["loss_before"]
    assert out["max_clean_loss_after"] < 2 * out["loss_before"]
    assert out["final_loss"] < 0.1 * out["losses"][0]
    assert out["final_loss"] < out["unguarded_final_loss"]
    assert out["params_finite"]
    assert any(line.startswith(f"{at:>5} ") for line in out["lines"])


# ------------------------------------- property: never worse than no guard
# A 5-layer ReLU MLP (width 16) regresses a teacher network; halfway through,
# the targets change sign, so the loss and the gradient norm jump to a new
# level for good (a guard that only trusts its old history would skip every
# later step). Every guard configuration the library documents trains next to
# the unguarded optimizer, on the same initial parameters and batches, for
# every (learning rate, seed), in one vmapped scan per inner optimizer. The
# learning rates are clear of the edge of stability, so the property holds by
# mechanism, not by luck: the small ones converge whatever a few skipped
# steps do, and the large one (SGD) overflows within the guards' warm-up,
# where guarded and plain updates are bit for bit the same.
PROP_STEPS, PROP_SEEDS, PROP_DIM, PROP_WIDTH, PROP_DEPTH = 300, 4, 8, 16, 5
SPIKE_GUARD_BOUND = 8  # spike_guard's default max_consecutive
GUARDS = {
    "spike_skip": lambda inner: optax_stab.spike_guard(inner),
    "spike_rescale": lambda inner: optax_stab.spike_guard(inner, action="rescale"),
    "spike_reset": lambda inner: optax_stab.spike_guard(inner, action="reset"),
    "nonfinite": lambda inner: optax_stab.guard_nonfinite(inner),
    "nonfinite_bounded": lambda inner: optax_stab.guard_nonfinite(
        inner, max_consecutive=SPIKE_GUARD_BOUND
    ),
}


def _teacher():
    k1, k2, k3 = jax.random.split(jax.random.key(1234), 3)
    w1 = jax.random.normal(k1, (PROP_DIM, 32)) / np.sqrt(PROP_DIM)
    w2 = jax.random.normal(k2, (32,)) / np.sqrt(32.0)
    x_test = jax.random.normal(k3, (512, PROP_DIM))
    scale = jnp.std(jnp.tanh(x_test @ w1) @ w2)

    def f(x):  # targets of variance 1
        return jnp.tanh(x @ w1) @ w2 / scale

    return f, x_test


def _mlp_init(key):
    sizes = [PROP_DIM] + [PROP_WIDTH] * (PROP_DEPTH - 1) + [1]
    keys = jax.random.split(key, PROP_DEPTH)
    return [
        {"w": jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]


def _mse(params, x, y):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return jnp.mean(jnp.square((x @ params[-1]["w"] + params[-1]["b"])[:, 0] - y))


def _acted(new, old):
    """Whether a guard acted on (skipped, rescaled, reset) this step."""
    if hasattr(new, "spike_steps"):
        return new.spike_steps > old.spike_steps
    skipped_new = new.nonfinite_steps - new.applied_nonfinite_steps
    return skipped_new > old.nonfinite_steps - old.applied_nonfinite_steps


def _longest_finite_run(acted, finite):
    """Longest run of acted-on steps in a row that ends at a finite step."""

    def step(run, xs):
        a, f = xs
        run = jnp.where(a, run + 1, 0)
        return run, jnp.where(a & f, run, 0)

    return jnp.max(jax.lax.scan(step, jnp.int32(0), (acted, finite))[1])


def _train_all(make_inner, lr, seed):
    f, x_test = _teacher()
    txs = {"plain": optax.with_extra_args_support(make_inner(lr))}
    txs.update({name: guard(make_inner(lr)) for name, guard in GUARDS.items()})
    init_key, data_key = jax.random.split(jax.random.key(seed))
    params = _mlp_init(init_key)
    carry = {name: (params, tx.init(params)) for name, tx in txs.items()}

    def step(carry, xs):
        t, key = xs
        x = jax.random.normal(key, (32, PROP_DIM))
        y = jnp.where(t < PROP_STEPS // 2, 1.0, -1.0) * f(x)
        new, record = {}, {}
        for name, tx in txs.items():
            p, s = carry[name]
            loss, grads = jax.value_and_grad(_mse)(p, x, y)
            updates, s_new = tx.update(grads, s, p, loss=loss)
            new[name] = (optax.apply_updates(p, updates), s_new)
            finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
            acted = jnp.zeros([], bool) if name == "plain" else _acted(s_new, s)
            record[name] = (acted, finite)
        return new, record

    xs = (jnp.arange(PROP_STEPS), jax.random.split(data_key, PROP_STEPS))
    carry, record = jax.lax.scan(step, carry, xs)
    final = {name: _mse(carry[name][0], x_test, -f(x_test)) for name in txs}
    longest = {name: _longest_finite_run(*record[name]) for name in txs}
    longest_any = {
        name: _longest_finite_run(record[name][0], jnp.ones_like(record[name][0]))
        for name in txs
    }
    return final, longest, longest_any


@pytest.mark.parametrize(
    ("inner", "lrs", "diverging"),
    [
        (lambda lr: optax.sgd(lr, momentum=0.9), (0.003, 0.01, 10.0), (10.0,)),
        (optax.adam, (0.003, 0.01, 0.1), ()),
    ],
    ids=["sgd_momentum", "adam"],
)
def test_no_guard_diverges_more_than_the_unguarded_optimizer(inner, lrs, diverging):
    run = jax.jit(
        jax.vmap(jax.vmap(functools.partial(_train_all, inner), (None, 0)), (0, None))
    )
    final, longest, longest_any = jax.tree.map(
        np.asarray, run(jnp.asarray(lrs), jnp.arange(PROP_SEEDS))
    )
    # Diverged: the final loss is NaN/Inf or twice that of predicting 0.
    diverged = {k: ~np.isfinite(v) | (v > 2.0) for k, v in final.items()}
    expected = np.isin(np.asarray(lrs), diverging)[:, None]
    np.testing.assert_array_equal(diverged["plain"], np.broadcast_to(expected, (3, 4)))
    for name in GUARDS:
        assert diverged[name].sum() <= diverged["plain"].sum(), name
        # Where plain training converges, so does every guard.
        assert not diverged[name][~expected[:, 0]].any(), name
    # The documented bounds: at most 8 finite steps in a row acted on by
    # spike_guard (non-finite ones are always skipped), at most 8 skipped
    # steps in a row by guard_nonfinite(max_consecutive=8).
    for name in ("spike_skip", "spike_rescale", "spike_reset"):
        assert 0 < longest[name].max() <= SPIKE_GUARD_BOUND, name
    assert longest_any["nonfinite_bounded"].max() <= SPIKE_GUARD_BOUND


def test_guard_freeze_example_quick():
    example = _examples.load_example("guard_freeze")
    out = example.main(["--quick", "--steps", "120"])
    assert out["longest_skip_run"].shape == (1, 2)
    assert out["longest_skip_run"].max() <= SPIKE_GUARD_BOUND
    total = out["spike_steps"] + out["accepted_steps"]
    np.testing.assert_array_equal(total, 120)
    assert np.all(np.isfinite(out["guarded_test_loss"]))
    assert np.all(np.isfinite(out["control_test_loss"]))
    assert np.all(np.isfinite(out["ulp_test_loss"]))


# ------------------------------------------------------------------ axis_name
# Gradients of {"w": (8, 4), "b": (8,)} split along their first axis over the
# 8 CPU devices under jax.shard_map (tests/_shard.py), one loss per device.
SHARD_STEPS = 16


@functools.cache
def _shard_stream():
    """``SHARD_STEPS`` gradients ~ N(0, 1) (global norm ~ 6.3), losses 1.0."""
    rng = np.random.default_rng(1)
    grads = {
        "w": rng.standard_normal((SHARD_STEPS, 8, 4)).astype(np.float32),
        "b": rng.standard_normal((SHARD_STEPS, 8)).astype(np.float32),
    }
    return grads, np.ones((SHARD_STEPS, _shard.N), np.float32)


def _shard_params():
    return {"w": jnp.zeros((8, 4)), "b": jnp.zeros(8)}


@functools.cache
def _axis_guard(kind, axis_name=None, **kwargs):
    inner = optax.sgd(1.0, momentum=0.9)
    if kind == "guard_nonfinite":
        return optax_stab.guard_nonfinite(inner, axis_name=axis_name)
    return optax_stab.spike_guard(inner, axis_name=axis_name, **kwargs)


def _on_every_device(states, field):
    """``field`` of every device's state, (steps, N); returns device 0's."""
    values = np.asarray(getattr(states, field))
    np.testing.assert_array_equal(values, values[:, :1].repeat(_shard.N, axis=1))
    return values[:, 0]


def _run_both(make, grads, losses):
    """Single-device and shard_map runs; asserts every device's state agrees."""
    params = _shard_params()
    expected = _shard.single(make(), params, grads, losses)
    got = _shard.sharded(make(axis_name=_shard.AXIS), params, grads, losses)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
        got[0],
        expected[0],
    )
    _shard.assert_every_device_matches(expected[1], got[1])
    return got


@pytest.mark.parametrize("kind", ["guard_nonfinite", "spike_guard"])
@pytest.mark.parametrize("where", ["grads", "loss"])
def test_nan_on_one_device_is_skipped_by_every_device(kind, where):
    grads, losses = _shard_stream()
    grads, losses = {k: v.copy() for k, v in grads.items()}, losses.copy()
    bad = 5
    if where == "grads":
        grads["w"][bad, 2, 1] = NAN  # only device 2's shard holds it
    else:
        losses[bad, 6] = NAN  # only device 6's loss
    make = functools.partial(_axis_guard, kind, window=8, warmup_steps=3)
    updates, states = _run_both(make, grads, losses)
    # Every shard of the bad step is zero, the finite ones included.
    for u in jax.tree.leaves(updates):
        np.testing.assert_array_equal(u[bad], np.zeros_like(u[bad]))
        assert np.all(u[bad + 1] != 0)
    steps = _on_every_device(states, "nonfinite_steps")
    np.testing.assert_array_equal(steps, (np.arange(SHARD_STEPS) >= bad) * 1)
    chex.assert_trees_all_equal(
        _at(states.inner_state, bad), _at(states.inner_state, bad - 1)
    )


def test_spike_in_one_shard_is_seen_by_every_device():
    grads, _ = _shard_stream()
    grads = {k: v.copy() for k, v in grads.items()}
    spike = SHARD_STEPS - 1
    # Device 5's rows grow 30-fold: its local norm ~ 67, the global norm too,
    # ~ 10x the usual ~ 6.3 (the other devices' shards are unchanged).
    grads["w"][spike, 5] *= 30.0
    grads["b"][spike, 5] *= 30.0
    make = functools.partial(
        _axis_guard, "spike_guard", window=16, warmup_steps=8, watch="grad_norm"
    )
    updates, states = _run_both(make, grads, None)
    for u in jax.tree.leaves(updates):
        np.testing.assert_array_equal(u[spike], np.zeros_like(u[spike]))
    spikes = _on_every_device(states, "spike_steps")
    np.testing.assert_array_equal(spikes, (np.arange(SHARD_STEPS) >= spike) * 1)
    # The z-score is the full gradient's, against the earlier global norms
    # (NumPy, float64; population standard deviation).
    norms = _norms({k: v.astype(np.float64) for k, v in grads.items()})
    z = (norms[spike] - norms[:spike].mean()) / norms[:spike].std()
    np.testing.assert_allclose(_on_every_device(states, "norm_z")[spike], z, rtol=1e-4)


def test_loss_watched_across_devices_is_the_mean_loss():
    grads, _ = _shard_stream()
    steps = 10
    grads = jax.tree.map(lambda x: x[:steps], grads)
    # Mean losses 1.0, 1.1, ... (mu = 1.05, sigma = 0.05 over the first 8);
    # the per-device offsets sum to 0.
    base = np.where(np.arange(steps) % 2 == 0, 1.0, 1.1)
    losses = base[:, None] + 0.02 * (np.arange(_shard.N) - 3.5)[None, :]
    # Step 8: device 0 alone jumps by 1.6 (a spike of its own history), the
    # mean by 0.2 to 1.2: z = 3, below mu + max(6 sigma, 0.1 mu) = 1.35.
    losses[8, 0] += 1.6
    # Step 9: device 0 jumps by 8.0, the mean to 2.1; over the 9 earlier
    # means mu = 9.6 / 9, sigma = 0.2 / 3, so z = 15.5 > 6 and 2.1 > 1.1 mu.
    losses[9, 0] += 8.0
    losses = losses.astype(np.float32)
    make = functools.partial(
        _axis_guard, "spike_guard", window=16, warmup_steps=3, watch="loss"
    )
    updates, states = _run_both(make, grads, losses)
    np.testing.assert_array_equal(
        _on_every_device(states, "spike_steps"), (np.arange(steps) == 9) * 1
    )
    loss_z = _on_every_device(states, "loss_z")
    # float32 losses differ from 1.0 and 1.1 by ~1e-7, 2e-6 of sigma.
    np.testing.assert_allclose(loss_z[[8, 9]], [3.0, 15.5], rtol=1e-4)
    for u in jax.tree.leaves(updates):
        assert np.all(u[8] != 0)  # applied on device 0 too
        np.testing.assert_array_equal(u[9], np.zeros_like(u[9]))
