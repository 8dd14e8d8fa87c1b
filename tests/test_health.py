"""health_monitor against closed forms; health_report on every container; diagnosis."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized

import optax_stab
from tests import _shard

NAN, INF = float("nan"), float("inf")


def _grads(a, b):
    """``w`` of norm ``2|a|`` (4 elements), ``b`` of norm ``|b|``."""
    return {"w": jnp.full((2, 2), a, jnp.float32), "b": jnp.full((1,), b, jnp.float32)}


def _run(tx, seq, params=None):
    params = _grads(0.0, 0.0) if params is None else params
    state = tx.init(params)
    for g in seq:
        _, state = tx.update(g, state, params)
    return state


class HealthMonitorTest(parameterized.TestCase):
    def test_updates_pass_through_and_fields_match_closed_forms(self):
        tx = optax_stab.health_monitor(decay=0.9)
        a = np.asarray([1.0, 3.0, 0.5, 2.0, 4.0])
        b = np.asarray([0.0, 1.0, 2.0, 0.5, 3.0])
        norms = np.sqrt(4 * a**2 + b**2)
        state = tx.init(_grads(0.0, 0.0))
        update = jax.jit(tx.update)
        for t in range(len(a)):
            g = _grads(a[t], b[t])
            u, state = update(g, state)
            chex.assert_trees_all_equal(u, g)
        # With decay 0.9 the first 10 norms are averaged exactly: the
        # statistics are the mean and population variance of the norms
        # *before* the current one.
        np.testing.assert_allclose(state.grad_norm, norms[-1], rtol=1e-6)
        np.testing.assert_allclose(state.norm_ema, norms[:-1].mean(), rtol=1e-6)
        np.testing.assert_allclose(state.norm_var_ema, norms[:-1].var(), rtol=1e-5)
        np.testing.assert_allclose(state.max_norm_seen, norms.max(), rtol=1e-6)
        np.testing.assert_allclose(state.leaf_norms["w"], 2 * a[-1], rtol=1e-6)
        np.testing.assert_allclose(state.leaf_norms["b"], b[-1], rtol=1e-6)
        np.testing.assert_allclose(state.min_leaf_norm, 3.0, rtol=1e-6)
        np.testing.assert_allclose(state.max_leaf_norm, 8.0, rtol=1e-6)
        self.assertEqual(int(state.health_step), 5)
        self.assertEqual(int(state.nonfinite_leaves), 0)
        for x in jax.tree.leaves(state):
            self.assertIn(x.dtype, (jnp.float32, jnp.int32))

    def test_ema_after_warm_up_follows_the_recursion(self):
        beta = 0.5
        tx = optax_stab.health_monitor(decay=beta)
        a = [1.0, 4.0, 2.0, 8.0, 3.0, 5.0]
        state = _run(tx, [_grads(x, 0.0) for x in a])
        mu, var = 2.0 * a[0], 0.0  # first value; then plain EMA with beta
        for x in a[1:-1]:
            delta = 2.0 * x - mu
            mu, var = mu + (1 - beta) * delta, beta * (var + (1 - beta) * delta**2)
        np.testing.assert_allclose(state.norm_ema, mu, rtol=1e-6)
        np.testing.assert_allclose(state.norm_var_ema, var, rtol=1e-6)

    def test_bfloat16_norms_are_accumulated_in_float32(self):
        g = {"w": jnp.ones((1000, 1000), jnp.bfloat16)}
        tx = optax_stab.health_monitor()
        u, state = tx.update(g, tx.init(g))
        self.assertEqual(u["w"].dtype, jnp.bfloat16)
        self.assertEqual(float(state.grad_norm), 1000.0)
        self.assertEqual(state.grad_norm.dtype, jnp.float32)

    def test_nonfinite_step_is_recorded_but_skips_the_statistics(self):
        tx = optax_stab.health_monitor(decay=0.9)
        good = [_grads(x, 1.0) for x in (1.0, 2.0, 3.0)]
        bad = {"w": _grads(1.0, 1.0)["w"].at[0, 0].set(NAN), "b": jnp.full((1,), INF)}
        state = _run(tx, [*good, bad])
        self.assertEqual(int(state.nonfinite_leaves), 2)
        self.assertEqual(int(state.health_step), 3)
        self.assertTrue(np.isnan(state.grad_norm))
        finite = np.sqrt(4 * np.asarray([1.0, 2.0, 3.0]) ** 2 + 1.0)
        np.testing.assert_allclose(state.max_norm_seen, finite.max(), rtol=1e-6)
        state = _run(tx, [*good, bad, _grads(1.0, 1.0)])
        self.assertEqual(int(state.nonfinite_leaves), 0)
        np.testing.assert_allclose(state.norm_ema, finite.mean(), rtol=1e-6)
        np.testing.assert_allclose(state.norm_var_ema, finite.var(), rtol=1e-5)

    def test_rejects_bad_decay(self):
        for decay in (1.0, -0.1, NAN):
            with self.assertRaisesRegex(ValueError, "`decay`.*got"):
                optax_stab.health_monitor(decay=decay)


class HealthReportTest(parameterized.TestCase):
    def test_vanishing_and_exploding(self):
        tx = optax_stab.health_monitor()
        steady = [_grads(1.0 + 0.1 * (t % 3), 1.0) for t in range(10)]
        report = optax_stab.health_report(_run(tx, steady))
        self.assertEqual(report["exploding"], 0.0)
        self.assertEqual(report["vanishing_leaves"], 0.0)
        self.assertTrue(all(isinstance(v, float) for v in report.values()))
        report = optax_stab.health_report(_run(tx, [*steady, _grads(50.0, 1.0)]))
        self.assertEqual(report["exploding"], 1.0)
        self.assertGreater(report["grad_norm_z"], 6.0)
        # |b| = 1 is not below 1e-3 * |w| = 0.1.
        self.assertEqual(report["vanishing_leaves"], 0.0)
        report = optax_stab.health_report(
            _run(tx, [*steady, _grads(1.0, 1e-4)]), vanishing_ratio=1e-3
        )
        self.assertEqual(report["vanishing_leaves"], 1.0)
        self.assertEqual(report["vanishing/b"], 1.0)
        self.assertNotIn("vanishing/w", report)
        report = optax_stab.health_report(_run(tx, [*steady, _grads(NAN, 1.0)]))
        self.assertEqual(report["exploding"], 1.0)

    def test_z_score_waits_for_eight_norms(self):
        tx = optax_stab.health_monitor()
        seq = [_grads(1.0 + 0.1 * (t % 2), 0.0) for t in range(5)] + [_grads(9.0, 0)]
        report = optax_stab.health_report(_run(tx, seq))
        self.assertEqual(report["grad_norm_z"], 0.0)
        self.assertEqual(report["exploding"], 0.0)

    def test_rejects_bad_arguments(self):
        state = optax_stab.health_monitor().init(jnp.zeros(1))
        with self.assertRaisesRegex(ValueError, "`vanishing_ratio`.*got"):
            optax_stab.health_report(state, vanishing_ratio=2.0)
        with self.assertRaisesRegex(ValueError, "`exploding_z`.*got"):
            optax_stab.health_report(state, exploding_z=0.0)
        with self.assertRaisesRegex(ValueError, "`stalled_fraction`.*got"):
            optax_stab.health_report(state, stalled_fraction=1.5)

    @parameterized.named_parameters(
        # After n skipped steps from the start, skip_fraction = 1 - 0.99**n:
        # 0.453 after 60, 0.553 after 80 (above the default 0.5).
        ("nonfinite_60", "nonfinite", 60, 0.0),
        ("nonfinite_80", "nonfinite", 80, 1.0),
        ("spike_60", "spike", 60, 0.0),
        ("spike_80", "spike", 80, 1.0),
    )
    def test_guard_stalled_when_most_recent_steps_were_skipped(
        self, guard, skipped, stalled
    ):
        if guard == "nonfinite":
            tx = optax_stab.guard_nonfinite(optax.sgd(0.1))
        else:
            tx = optax_stab.spike_guard(optax.sgd(0.1), warmup_steps=0)
        params = _grads(0.0, 0.0)
        state = tx.init(params)
        update = jax.jit(tx.update)
        for _ in range(20):
            _, state = update(_grads(1.0, 1.0), state, params, loss=1.0)
        report = optax_stab.health_report(state)
        self.assertEqual(report["guard_stalled"], 0.0)
        self.assertEqual(report["skip_fraction"], 0.0)
        for _ in range(skipped):  # a NaN loss: skipped by both guards, for good
            _, state = update(_grads(1.0, 1.0), state, params, loss=NAN)
        report = optax_stab.health_report(state)
        np.testing.assert_allclose(
            report["skip_fraction"], 1 - 0.99**skipped, rtol=1e-4
        )
        self.assertEqual(report["guard_stalled"], stalled)
        self.assertEqual(
            optax_stab.health_report(state, stalled_fraction=0.4)["guard_stalled"],
            1.0,
        )
        # Training resumes: the fraction decays, the flag clears.
        for _ in range(100):
            _, state = update(_grads(1.0, 1.0), state, params, loss=1.0)
        self.assertEqual(optax_stab.health_report(state)["guard_stalled"], 0.0)


# ------------------------------------------------------------------ containers
class _ClipLikeState(NamedTuple):
    """A clipper state from elsewhere: found by its field names only."""

    pre_clip_norm: Any
    clipped_steps: jax.Array
    history: jax.Array


def _clip_like(per_leaf: bool):
    def init_fn(params):
        norm = jax.tree.map(lambda _: jnp.zeros([]), params) if per_leaf else 0.0
        return _ClipLikeState(
            jnp.asarray(norm) if not per_leaf else norm, 0, jnp.zeros(5)
        )

    def update_fn(updates, state, params=None):
        del params
        if per_leaf:
            norm = jax.tree.map(jnp.linalg.norm, updates)
        else:
            norm = optax.tree.norm(updates)
        return updates, state._replace(pre_clip_norm=norm, clipped_steps=7)

    return optax.GradientTransformation(init_fn, update_fn)


def _mon():
    return optax_stab.health_monitor()


PARAMS = {"w": jnp.ones((2, 2)), "b": jnp.ones(1)}
GRADS = _grads(1.0, 2.0)  # norms: w 2, b 2, global sqrt(8)


def _report(tx, steps=1, **extra):
    state = tx.init(PARAMS)
    for _ in range(steps):
        _, state = tx.update(GRADS, state, PARAMS, **extra)
    return optax_stab.health_report(state)


class ContainerTest(parameterized.TestCase):
    def test_chain_with_clipper_and_guard(self):
        tx = optax.chain(
            _mon(),
            _clip_like(per_leaf=False),
            optax_stab.spike_guard(optax.adam(0.1), window=4),
        )
        r = _report(tx, loss=1.0)
        np.testing.assert_allclose(r["grad_norm"], np.sqrt(8), rtol=1e-6)
        np.testing.assert_allclose(r["pre_clip_norm"], np.sqrt(8), rtol=1e-6)
        self.assertEqual(r["clipped_steps"], 7.0)
        self.assertNotIn("history", r)
        self.assertEqual(r["leaf_norm/w"], 2.0)
        for key in ("spike_steps", "nonfinite_steps", "loss_z", "norm_z"):
            self.assertEqual(r[key], 0.0)
        self.assertEqual(r["accepted_steps"], 1.0)

    def test_per_leaf_pre_clip_norm(self):
        r = _report(_clip_like(per_leaf=True))
        self.assertEqual(
            r, {"pre_clip_norm/b": 2.0, "pre_clip_norm/w": 2.0, "clipped_steps": 7.0}
        )

    def test_optax_stab_clip_by_norm(self):
        r = _report(optax.chain(optax_stab.clip_by_norm(1.0), _mon()))
        np.testing.assert_allclose(r["pre_clip_norm"], np.sqrt(8), rtol=1e-6)
        np.testing.assert_allclose(r["grad_norm"], 1.0, rtol=1e-6)

    def test_two_monitors_get_their_chain_index(self):
        tx = optax.chain(_mon(), optax.clip_by_global_norm(1.0), _mon(), optax.sgd(0.1))
        r = _report(tx)
        np.testing.assert_allclose(r["0/grad_norm"], np.sqrt(8), rtol=1e-6)
        np.testing.assert_allclose(r["2/grad_norm"], 1.0, rtol=1e-6)
        self.assertIn("0/leaf_norm/w", r)
        self.assertNotIn("grad_norm", r)

    def test_masked(self):
        tx = optax.masked(optax.chain(_mon(), optax.sgd(0.1)), {"w": True, "b": False})
        r = _report(tx)
        self.assertEqual(r["leaf_norm/w"], 2.0)
        self.assertNotIn("leaf_norm/b", r)

    def test_multi_transform(self):
        tx = optax.multi_transform(
            {
                "a": optax.chain(_mon(), optax.sgd(0.1)),
                "c": optax.chain(_mon(), optax.adam(0.1)),
            },
            {"w": "a", "b": "c"},
        )
        r = _report(tx)
        self.assertEqual(r["a/0/leaf_norm/w"], 2.0)
        self.assertEqual(r["c/0/leaf_norm/b"], 2.0)
        self.assertEqual(r["c/0/grad_norm"], 2.0)

    def test_multisteps(self):
        tx = optax.MultiSteps(optax.chain(_mon(), optax.sgd(0.1)), every_k_schedule=2)
        r = _report(tx, steps=4)
        self.assertEqual(r["health_step"], 2.0)
        np.testing.assert_allclose(r["grad_norm"], np.sqrt(8), rtol=1e-6)

    def test_inject_hyperparams(self):
        tx = optax.chain(
            _mon(), optax.inject_hyperparams(optax.sgd)(learning_rate=0.25)
        )
        r = _report(tx)
        self.assertEqual(r["hyperparams/learning_rate"], 0.25)
        guarded = optax.inject_hyperparams(
            optax_stab.spike_guard, static_args=("window",)
        )(inner=optax.sgd(0.1), window=4, z_threshold=3.0)
        r = _report(guarded)
        self.assertEqual(r["hyperparams/z_threshold"], 3.0)
        self.assertEqual(r["hyperparams/warmup_steps"], 20.0)
        self.assertEqual(r["spike_steps"], 0.0)

    def test_nested_guards_and_apply_if_finite(self):
        tx = optax_stab.guard_nonfinite(
            optax_stab.spike_guard(optax.apply_if_finite(optax.sgd(0.1), 3))
        )
        r = _report(tx)
        self.assertEqual(r["nonfinite_steps"], 0.0)
        self.assertEqual(r["inner_state/nonfinite_steps"], 0.0)
        self.assertEqual(r["total_notfinite"], 0.0)

    def test_same_fields_other_class_is_found(self):
        state = optax_stab.health_monitor().init(PARAMS)
        Other = NamedTuple("Other", [(f, Any) for f in state._fields])
        r = optax_stab.health_report((Other(*state),))
        self.assertIn("leaf_norm/w", r)

    def test_nnx_optimizer(self):
        from flax import nnx

        class Model(nnx.Module):
            def __init__(self, rngs):
                self.Dense_0 = nnx.Linear(3, 4, rngs=rngs)
                self.layers = nnx.List([nnx.Linear(4, 2, rngs=rngs)])

            def __call__(self, x):
                return self.layers[0](jnp.tanh(self.Dense_0(x)))

        model = Model(nnx.Rngs(0))
        tx = optax.chain(_mon(), optax_stab.spike_guard(optax.adam(0.1), window=4))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(jnp.ones((2, 3))) ** 2))(
            model
        )
        optimizer.update(model, grads, loss=loss)
        r = optax_stab.health_report(optimizer.opt_state)
        self.assertEqual(r, optax_stab.health_report(optimizer))
        ref = float(jnp.linalg.norm(grads["Dense_0"]["kernel"][...]))
        np.testing.assert_allclose(r["leaf_norm/Dense_0/kernel"], ref, rtol=1e-6)
        self.assertIn("leaf_norm/layers/0/bias", r)
        self.assertEqual(r["accepted_steps"], 1.0)
        self.assertTrue(all(isinstance(v, float) for v in r.values()))


# ------------------------------------------------------------------ diagnosis
DEPTH, WIDTH = 20, 8


@functools.cache
def _mlp():
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(DEPTH):
                x = jnp.tanh(nn.Dense(WIDTH)(x))
            return nn.Dense(1)(x)

    model = MLP()
    x = jax.random.normal(jax.random.key(0), (32, WIDTH))
    y = jnp.sin(jnp.sum(x, axis=1, keepdims=True))
    # LeCun-normal kernels (variance 1 / fan_in): the critical init for tanh.
    params = model.init(jax.random.key(1), x)["params"]
    tx = optax.chain(optax_stab.health_monitor(), optax.scale(-1.0))

    @jax.jit
    def step(params, state, lr):
        def loss_fn(p):
            return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

        grads = jax.grad(loss_fn)(params)
        u, state = tx.update(grads, state, params)
        return jax.tree.map(lambda p, d: p + lr * d, params, u), state

    return params, tx, step


def _diagnose(init_scale, lr, steps):
    """Trains with kernels scaled by ``init_scale``; the report after each step."""
    params, tx, step = _mlp()
    params = {k: {**v, "kernel": v["kernel"] * init_scale} for k, v in params.items()}
    state = tx.init(params)
    reports = []
    for _ in range(steps):
        params, state = step(params, state, lr)
        reports.append(optax_stab.health_report(state))
    return reports


class DiagnosisTest(parameterized.TestCase):
    def test_tiny_init_vanishes_in_early_layers(self):
        reports = _diagnose(0.05, 0.05, 3)
        for r in reports:
            self.assertGreater(r["vanishing_leaves"], 10)
            self.assertEqual(r["exploding"], 0.0)
            for layer in range(5):
                self.assertEqual(r[f"vanishing/Dense_{layer}/kernel"], 1.0)

    def test_large_init_explodes(self):
        # At a learning rate the critical init trains with (below), kernels
        # 4x too large start with a ~500x larger gradient norm and diverge.
        reports = _diagnose(4.0, 0.3, 40)
        healthy = _diagnose(1.0, 0.3, 1)
        self.assertGreater(reports[0]["grad_norm"], 100 * healthy[0]["grad_norm"])
        self.assertGreater(sum(r["exploding"] for r in reports), 10)

    def test_good_init_is_healthy(self):
        reports = _diagnose(1.0, 0.3, 40)
        for r in reports:
            self.assertEqual(r["vanishing_leaves"], 0.0)
            self.assertEqual(r["exploding"], 0.0)


# ------------------------------------------------------------------ axis_name
def test_statistics_under_shard_map_are_those_of_the_full_updates():
    # Leaves split along their first axis over the 8 CPU devices; step 5 has
    # a NaN in device 3's shard of ``b`` only.
    rng = np.random.default_rng(0)
    steps, bad = 6, 5
    grads = {
        "w": rng.standard_normal((steps, 8, 4)).astype(np.float32),
        "b": (0.1 * rng.standard_normal((steps, 8))).astype(np.float32),
    }
    grads["b"][bad, 3] = NAN
    params = {"w": jnp.zeros((8, 4)), "b": jnp.zeros(8)}
    tx, tx_axis = (
        optax_stab.health_monitor(decay=0.9, axis_name=a) for a in (None, _shard.AXIS)
    )
    expected = _shard.single(tx, params, grads)
    updates, states = _shard.sharded(tx_axis, params, grads)
    chex.assert_trees_all_equal(updates, grads)  # identity, NaN included
    _shard.assert_every_device_matches(expected[1], states)
    # NumPy references, float64, on every device.
    w = np.linalg.norm(grads["w"].astype(np.float64).reshape(steps, -1), axis=1)
    b = np.linalg.norm(grads["b"].astype(np.float64), axis=1)
    total = np.hypot(w, b)
    every = lambda x: np.asarray(x).T  # noqa: E731  (N, steps)
    for d_w, d_b, d_norm in zip(
        every(states.leaf_norms["w"]),
        every(states.leaf_norms["b"]),
        every(states.grad_norm),
    ):
        np.testing.assert_allclose(d_w, w, rtol=1e-6)
        np.testing.assert_allclose(d_b, b, rtol=1e-6)  # NaN at the bad step
        np.testing.assert_allclose(d_norm, total, rtol=1e-6)
    for d_min, d_max in zip(every(states.min_leaf_norm), every(states.max_leaf_norm)):
        np.testing.assert_allclose(d_min[:bad], np.minimum(w, b)[:bad], rtol=1e-6)
        np.testing.assert_allclose(d_max[:bad], np.maximum(w, b)[:bad], rtol=1e-6)
    flags = every(states.nonfinite_leaves)
    np.testing.assert_array_equal(flags, np.tile(np.arange(steps) == bad, (8, 1)))
    # The first 1/(1 - decay) = 10 norms are averaged exactly: after step 5 the
    # statistics hold the mean and population variance of norms 0..4.
    np.testing.assert_allclose(
        every(states.norm_ema)[:, bad], total[:bad].mean(), rtol=1e-5
    )
    np.testing.assert_allclose(
        every(states.norm_var_ema)[:, bad], total[:bad].var(), rtol=1e-4
    )
