"""The seeds' methods that optax already has, chained with ours, vs closed forms.

Each recipe is the one-liner the docs show: value clipping ``optax.clip``,
AGC ``optax.adaptive_grad_clip``, linear decay ``optax.linear_schedule``,
weight regularisation ``optax.add_decayed_weights`` (with the seed's sign
corrected) and gradient accumulation ``optax.MultiSteps``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_stab


def _sequence(steps, shape=(6,), seed=0):
    g = jax.random.normal(jax.random.key(seed), (steps, *shape)) * 3.0
    return np.asarray(g, np.float64)


def _run(tx, grads, w0):
    """Applies ``tx`` to ``grads`` (a stack) from ``w0``; returns every w."""
    update = jax.jit(tx.update)
    w, state, ws = jnp.asarray(w0, jnp.float32), tx.init(jnp.asarray(w0)), []
    for g in grads:
        u, state = update(jnp.asarray(g, jnp.float32), state, w)
        w = optax.apply_updates(w, u)
        ws.append(np.asarray(w, np.float64))
    return ws


def _clip_norm(v, max_norm):
    n = np.linalg.norm(v)
    return v * min(1.0, max_norm / n)


def test_value_clipping_then_norm_clipping():
    # Seed 003 remedy 5: clip(g, -eps, eps), here before clip_by_norm.
    grads = _sequence(5)
    tx = optax.chain(optax.clip(2.0), optax_stab.clip_by_norm(3.0), optax.sgd(0.1))
    w, ws = np.zeros(6), _run(tx, grads, np.zeros(6))
    for g, got in zip(grads, ws):
        w = w - 0.1 * _clip_norm(np.clip(g, -2.0, 2.0), 3.0)
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)


def test_agc_then_sign_sqrt_amplification():
    # AGC (Brock et al. 2021): each output unit of a kernel is clipped to
    # clipping * max(||W_unit||, eps); then seed 004's sign-sqrt.
    params = {
        "kernel": jax.random.normal(jax.random.key(1), (5, 3)) * 0.1,
        "bias": jnp.array([0.0, 1.0, -2.0]),
    }
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.7), params)
    tx = optax.chain(
        optax.adaptive_grad_clip(0.05), optax_stab.sign_sqrt_amplification(0.5)
    )
    u, _ = tx.update(grads, tx.init(params), params)

    def agc(g, w, axis):
        w_norm = np.maximum(np.linalg.norm(w, axis=axis, keepdims=True), 1e-3)
        g_norm = np.linalg.norm(g, axis=axis, keepdims=True)
        limit = 0.05 * w_norm
        return np.where(g_norm < limit, g, g * limit / g_norm)

    for name, axis in (("kernel", 0), ("bias", None)):
        g = agc(np.asarray(grads[name], np.float64), np.asarray(params[name]), axis)
        expected = np.sign(g) * np.sqrt(0.5 * np.abs(g))
        np.testing.assert_allclose(u[name], expected, rtol=1e-5)


def test_linear_decay_with_norm_clipping_sums_an_arithmetic_series():
    # Seed 003 remedy 2: eta_t = eta0 (1 - t / T). A constant gradient of
    # norm 5 clipped to 1 moves w by eta0 * sum_{t<T} (1 - t/T) = eta0 (T+1)/2
    # along -g/|g|, and not at all after T.
    eta0, big_t = 0.2, 10
    g = np.array([3.0, 4.0, 0.0, 0.0, 0.0, 0.0])
    tx = optax.chain(
        optax_stab.clip_by_norm(1.0), optax.sgd(optax.linear_schedule(eta0, 0.0, big_t))
    )
    ws = _run(tx, [g] * (big_t + 3), np.zeros(6))
    direction = -g / 5.0
    for t, got in enumerate(ws, start=1):
        moved = eta0 * sum(1 - k / big_t for k in range(min(t, big_t)))
        np.testing.assert_allclose(got, moved * direction, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        ws[big_t - 1], eta0 * (big_t + 1) / 2 * direction, rtol=1e-5
    )


def test_inverse_sqrt_decay_with_sign_sqrt_amplification():
    # Seed 003 remedy 4 with seed 004's update: w_T = -sum_t eta_t sign(g) sqrt(|g|).
    eta, alpha, big_t = 0.1, 3.0, 8
    g = np.array([0.04, -9.0, 1.0, 0.0, 0.25, -0.01])
    tx = optax.chain(
        optax_stab.sign_sqrt_amplification(1.0),
        optax.sgd(optax_stab.inverse_sqrt_decay(eta, alpha, big_t)),
    )
    ws = _run(tx, [g] * big_t, np.zeros(6))
    rates = eta / np.sqrt(1 + alpha * np.arange(big_t) / big_t)
    expected = -np.cumsum(rates)[-1] * np.sign(g) * np.sqrt(np.abs(g))
    np.testing.assert_allclose(ws[-1], expected, rtol=1e-5, atol=1e-7)


def test_weight_clipping_with_weight_regularisation_uses_the_corrected_sign():
    # Seed 003 remedy 6: w <- clip(w - eta g - eta lam w, -eps, eps). The article
    # writes "+ lam w", which grows the weights; add_decayed_weights shrinks them.
    eta, lam, eps = 0.1, 0.5, 1.0
    tx = optax.chain(
        optax.add_decayed_weights(lam), optax.sgd(eta), optax_stab.clip_weights(eps)
    )
    grads = _sequence(30, seed=2)
    w0 = np.array([0.9, -0.5, 0.0, 0.3, -1.0, 0.7])
    w = w0.copy()
    for g, got in zip(grads, _run(tx, grads, w0)):
        w = np.clip(w - eta * g - eta * lam * w, -eps, eps)
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)
        assert np.all(np.abs(got) <= eps)
    # Without gradients the weights decay geometrically, unlike the article's
    # formula clip(w + lam w), which drives every weight to the bound.
    ws = _run(tx, np.zeros((20, 6)), w0)
    np.testing.assert_allclose(ws[-1], w0 * (1 - eta * lam) ** 20, rtol=1e-5)
    article = w0.copy()
    for _ in range(20):
        article = np.clip(article + lam * article, -eps, eps)
    assert np.all(np.abs(ws[-1]) < 0.5 * np.abs(w0) + 1e-12)
    assert np.all(np.abs(article[w0 != 0]) == eps)


def test_l1_penalty_recipe():
    # Seed 003 remedy 1 with R(w) = |w|_1: w <- w - eta (g + lam sign(w)).
    eta, lam = 0.05, 0.3
    tx = optax.chain(optax_stab.add_l1_penalty(lam), optax.sgd(eta))
    grads = _sequence(10, seed=3)
    w = np.array([0.9, -0.5, 0.2, 0.3, -1.0, 0.7])
    for g, got in zip(grads, _run(tx, grads, w)):
        w = w - eta * (g + lam * np.sign(w))
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_with_norm_clipping_and_sign_sqrt():
    # Seed 004 compares against gradient accumulation: MultiSteps averages k
    # gradients, and the inner chain sees only their mean, once every k steps.
    k, eta = 4, 0.1
    grads = _sequence(3 * k, seed=4)
    for inner, fn in (
        (optax_stab.clip_by_norm(2.0), lambda m: _clip_norm(m, 2.0)),
        (
            optax_stab.sign_sqrt_amplification(1.0),
            lambda m: np.sign(m) * np.sqrt(np.abs(m)),
        ),
    ):
        tx = optax.MultiSteps(optax.chain(inner, optax.sgd(eta)), every_k_schedule=k)
        ws = _run(tx, grads, np.zeros(6))
        w = np.zeros(6)
        for t, got in enumerate(ws):
            if t % k == k - 1:
                w = w - eta * fn(grads[t - k + 1 : t + 1].mean(axis=0))
            np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)


def test_cosine_annealing_with_adam_and_ema_smoothing():
    # Seed 3: Adam with cosine annealing, on smoothed gradients.
    grads, lr0, steps = _sequence(6), 0.1, 6
    sched = optax.cosine_decay_schedule(lr0, decay_steps=steps)
    tx = optax.chain(optax_stab.ema_smoothing(0.5), optax.adam(sched))
    ws = _run(tx, grads, np.zeros(6))
    w, m, v, e = np.zeros(6), np.zeros(6), np.zeros(6), np.zeros(6)
    for t, (g, got) in enumerate(zip(grads, ws), start=1):
        e = 0.5 * e + 0.5 * g
        s = e / (1 - 0.5**t)
        m, v = 0.9 * m + 0.1 * s, 0.999 * v + 0.001 * s**2
        lr = lr0 * 0.5 * (1 + np.cos(np.pi * (t - 1) / steps))
        w = w - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-6)


def test_smoothing_gated_on_by_a_schedule():
    # Seed 1's open problem: smoothing that is not applied blindly from step 1.
    # A decay schedule of 0 (the identity) for 3 steps, then 0.8, switches the
    # EMA on; debiasing divides by the weight the EMA actually gave the
    # gradients (1 after the identity steps), not by 1 - 0.8**t.
    gate = optax.join_schedules(
        [optax.constant_schedule(0.0), optax.constant_schedule(0.8)], [3]
    )
    tx = optax.inject_hyperparams(optax_stab.ema_smoothing)(decay=gate)
    grads = _sequence(6)
    state, update = tx.init(jnp.zeros(6)), jax.jit(tx.update)
    m, mass = np.zeros(6), 0.0
    for t, g in enumerate(grads):
        u, state = update(jnp.asarray(g, jnp.float32), state)
        if t < 3:
            np.testing.assert_array_equal(u, np.float32(g))
        decay = 0.0 if t < 3 else 0.8
        m, mass = decay * m + (1 - decay) * g, decay * mass + (1 - decay)
        np.testing.assert_allclose(u, m / mass, rtol=1e-5, atol=1e-6)
    # Step 4 is 0.8 * g_3 + 0.2 * g_4: weights summing to one, no inflation.
    assert mass == 1.0
