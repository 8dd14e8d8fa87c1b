"""Clippers against NumPy re-implementations of the papers, properties, bad args.

The references below are written from the papers' equations (AutoClip:
Seetharaman et al. 2020; ZClip: Kumar et al. 2025 and its reference code;
AdaGC: Wang et al. 2025; SPAM: Huang et al. 2025) in float64, with the one
rule the papers leave open made explicit: a step with a NaN or Inf passes
unchanged and leaves the statistics untouched.
"""

from __future__ import annotations

import functools

import chex
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import optax_stab
from optax_stab import _ring, _tree

STEPS = 200
SHAPES = {"b": (5,), "w": (4, 3)}  # sorted: the order of jax.tree.leaves
NAN, INF = float("nan"), float("inf")
SPIKE_10X, SPIKE_1000X, SPIKE_W_ONLY, INF_STEP, NAN_STEP = 40, 100, 130, 70, 150


# ------------------------------------------------------------- the sequence
@functools.cache
def spiky_sequence() -> dict[str, np.ndarray]:
    """200 gradient pytrees whose norm wanders, with injected spikes.

    Step 40 is 10x, step 100 is 1000x, step 130 is 10x in ``w`` only, step 70
    holds an Inf (in ``w``) and step 150 a NaN (in ``b``).
    """
    kw, kb, ks = jax.random.split(jax.random.key(0), 3)
    t = np.arange(STEPS)
    scale = np.exp(0.3 * np.asarray(jax.random.normal(ks, (STEPS,))))
    scale = scale * (1.0 + 0.5 * np.sin(t / 15.0))
    w = np.asarray(jax.random.normal(kw, (STEPS, 4, 3))) * scale[:, None, None]
    b = 0.5 * np.asarray(jax.random.normal(kb, (STEPS, 5))) * scale[:, None]
    w[SPIKE_10X] *= 10
    b[SPIKE_10X] *= 10
    w[SPIKE_1000X] *= 1000
    b[SPIKE_1000X] *= 1000
    w[SPIKE_W_ONLY] *= 10
    w[INF_STEP, 1, 2] = INF
    b[NAN_STEP, 3] = NAN
    return {"b": b.astype(np.float32), "w": w.astype(np.float32)}


def _steps(seq):
    return [{k: v[t].astype(np.float64) for k, v in seq.items()} for t in range(STEPS)]


def np_norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(x)) for x in tree.values())))


def _finite(tree) -> bool:
    return all(np.all(np.isfinite(x)) for x in tree.values())


def _scaled(tree, s):
    return {k: x * s for k, x in tree.items()}


@functools.cache
def _run_scan(tx):
    """Runs ``tx`` over the sequence in one jitted scan; returns outputs, states."""
    seq = spiky_sequence()
    params = {k: jnp.zeros(v.shape[1:]) for k, v in seq.items()}

    def step(state, g):
        u, state = tx.update(g, state, params)
        return state, (u, state)

    _, (outs, states) = jax.jit(lambda s, gs: jax.lax.scan(step, s, gs))(
        tx.init(params), seq
    )
    return jax.tree.map(np.asarray, outs), jax.tree.map(np.asarray, states)


def _at(tree, t):
    return jax.tree.map(lambda x: x[t], tree)


def assert_out(out, t, expected, rtol=2e-5):
    for k in expected:
        np.testing.assert_allclose(out[k][t], expected[k], rtol=rtol, atol=1e-6)


# ------------------------------------------------------------ the references
def ref_clip_by_norm(steps, max_norm):
    outs, norms = [], []
    for g in steps:
        n = np_norm(g)
        clip = np.isfinite(n) and n > max_norm
        outs.append(_scaled(g, max_norm / n) if clip else g)
        norms.append(n)
    return outs, norms


def ref_autoclip(steps, percentile, history):
    """Seetharaman et al. 2020, Alg. 1, with the history bounded."""
    hist, outs, limits = [], [], []
    for g in steps:
        n = np_norm(g)
        if not np.isfinite(n):
            outs.append(g)
            limits.append(None)
            continue
        hist = [*hist, n][-history:]
        limit = np.percentile(hist, percentile)
        outs.append(_scaled(g, min(1.0, limit / n)) if n > 0 else g)
        limits.append(list(hist))
    return outs, limits


def ref_zclip(steps, decay, z_thr, warmup, mode, max_norm, eps):
    """Kumar et al. 2025, Alg. 1 (and bluorion-com/ZClip's update order)."""
    buffer, mean, var = [], None, None
    outs, stats = [], []
    for g in steps:
        n = np_norm(g)
        if not np.isfinite(n):
            outs.append(g)
            stats.append(None)
            continue
        if len(buffer) < warmup:
            buffer.append(n)
            limit = INF if max_norm is None else max_norm
            if len(buffer) == warmup:
                mean, var = float(np.mean(buffer)), float(np.var(buffer))
            stats.append((np.mean(buffer), np.var(buffer), n > limit))
        else:
            std = np.sqrt(var)
            z = (n - mean) / (std + eps)
            target = n
            if z > z_thr:
                target = mean + z_thr**2 * std / z if mode == "adaptive" else mean
            limit = target if max_norm is None else min(target, max_norm)
            mean = decay * mean + (1 - decay) * target
            var = decay * var + (1 - decay) * (target - mean) ** 2
            stats.append((mean, var, n > limit))
        outs.append(_scaled(g, limit / n) if n > limit else g)
    return outs, stats


def ref_adagc(steps, decay, relative, warmup, max_norm):
    """Wang et al. 2025, Alg. 1: global clipping in warm-up, then per tensor."""
    gamma, count, outs, gammas = {}, 0, [], []
    for g in steps:
        if not _finite(g):
            outs.append(g)
            gammas.append(None)
            continue
        norms = {k: np.sqrt(np.sum(np.square(x))) for k, x in g.items()}
        if count < warmup:
            total = np_norm(g)
            h = {k: min(1.0, max_norm / total) for k in g}
        else:
            h = {k: min(1.0, relative * gamma[k] / norms[k]) for k in g}
        out = {k: g[k] * h[k] for k in g}
        for k in g:
            clipped = norms[k] * h[k]
            if count == 0:
                gamma[k] = clipped
            elif count < warmup:
                gamma[k] = min(gamma[k], clipped)
            else:
                gamma[k] = decay * gamma[k] + (1 - decay) * clipped
        count += 1
        outs.append(out)
        gammas.append(dict(gamma))
    return outs, gammas


def ref_spam(steps, threshold, decay, warmup):
    """Huang et al. 2025, spike-aware clipping against an EMA of g**2."""
    nu = {k: np.zeros_like(x) for k, x in steps[0].items()}
    count, outs, nus = 0, [], []
    for g in steps:
        if not _finite(g):
            outs.append(g)
            nus.append(None)
            continue
        out = {}
        for k, x in g.items():
            cap2 = threshold * nu[k]
            spike = (count >= warmup) & (nu[k] > 0) & (x**2 > cap2)
            out[k] = np.where(spike, np.sign(x) * np.sqrt(cap2), x)
            nu[k] = decay * nu[k] + (1 - decay) * out[k] ** 2
        count += 1
        outs.append(out)
        nus.append({k: v.copy() for k, v in nu.items()})
    return outs, nus


# ------------------------------------------- 200 steps against the references
class SpikySequenceTest(parameterized.TestCase):
    def test_sequence_has_the_injected_spikes(self):
        norms = [np_norm(g) for g in _steps(spiky_sequence())]
        typical = np.nanmedian(np.where(np.isinf(norms), np.nan, norms))
        assert norms[SPIKE_1000X] > 300 * typical
        assert norms[SPIKE_10X] > 3 * typical
        assert np.isinf(norms[INF_STEP]) and np.isnan(norms[NAN_STEP])

    def _check_nonfinite_steps_pass(self, out, only_bad_leaf=False):
        seq = spiky_sequence()
        for t, bad in ((INF_STEP, "w"), (NAN_STEP, "b")):
            for k in [bad] if only_bad_leaf else seq:
                np.testing.assert_array_equal(out[k][t], seq[k][t])

    @parameterized.parameters("global", "leaf")
    def test_clip_by_norm(self, scope):
        steps = _steps(spiky_sequence())
        out, states = _run_scan(optax_stab.clip_by_norm(2.0, scope=scope))
        for t, g in enumerate(steps):
            if scope == "global":
                (exp,), (norm,) = ref_clip_by_norm([g], 2.0)
                np.testing.assert_allclose(states.pre_clip_norm[t], norm, rtol=1e-6)
            else:
                exp = {
                    k: ref_clip_by_norm([{k: x}], 2.0)[0][0][k] for k, x in g.items()
                }
            assert_out(out, t, exp)
        # With scope="leaf" only the non-finite leaf passes; the other is clipped.
        self._check_nonfinite_steps_pass(out, only_bad_leaf=scope == "leaf")

    def test_autoclip(self):
        steps = _steps(spiky_sequence())
        out, states = _run_scan(optax_stab.autoclip(10.0, history=50))
        exp, hists = ref_autoclip(steps, 10.0, 50)
        for t in range(STEPS):
            assert_out(out, t, exp[t])
            if hists[t] is not None:  # the ring holds exactly the last norms
                ring = _at(states.norms, t)
                kept = np.sort(ring.values[np.asarray(_ring.valid(ring))])
                np.testing.assert_allclose(kept, np.sort(hists[t]), rtol=1e-6)
        assert states.clipped_steps[-1] > 100  # the 10th percentile clips often
        self._check_nonfinite_steps_pass(out)

    @parameterized.parameters(("adaptive", None), ("mean", None), ("adaptive", 6.0))
    def test_zscore_clip(self, mode, max_norm):
        steps = _steps(spiky_sequence())
        kw = {"decay": 0.9, "z_threshold": 2.0, "warmup_steps": 10, "eps": 1e-6}
        tx = optax_stab.zscore_clip(mode=mode, max_norm=max_norm, **kw)
        out, states = _run_scan(tx)
        exp, stats = ref_zclip(steps, kw["decay"], 2.0, 10, mode, max_norm, kw["eps"])
        clips = 0
        for t in range(STEPS):
            assert_out(out, t, exp[t])
            if stats[t] is not None:
                mean, var, clipped = stats[t]
                np.testing.assert_allclose(states.norm_mean[t], mean, rtol=2e-5)
                np.testing.assert_allclose(states.norm_var[t], var, rtol=1e-4)
                clips += clipped
        # The 1000x spike is cut to about the running mean.
        assert np_norm(_at(out, SPIKE_1000X)) < 3 * float(states.norm_mean[99])
        assert states.clipped_steps[-1] == clips > 0
        assert states.count[-1] == STEPS - 2
        self._check_nonfinite_steps_pass(out)

    def test_adaptive_tensor_clip(self):
        steps = _steps(spiky_sequence())
        tx = optax_stab.adaptive_tensor_clip(
            decay=0.9, relative=1.05, warmup_steps=10, warmup_max_norm=3.0
        )
        out, states = _run_scan(tx)
        exp, gammas = ref_adagc(steps, 0.9, 1.05, 10, 3.0)
        for t in range(STEPS):
            assert_out(out, t, exp[t])
            if gammas[t] is not None:
                for k, gamma in gammas[t].items():
                    got = states.clip_norm_ema[k][t]
                    np.testing.assert_allclose(got, gamma, rtol=2e-5)
        # The w-only spike cuts w to 1.05 x its EMA; b is scaled on its own.
        t, seq = SPIKE_W_ONLY, spiky_sequence()
        w_norm = np.linalg.norm(out["w"][t].astype(np.float64))
        np.testing.assert_allclose(
            w_norm, 1.05 * states.clip_norm_ema["w"][t - 1], rtol=1e-5
        )
        w_scale = w_norm / np.linalg.norm(seq["w"][t])
        b_scale = np.linalg.norm(out["b"][t]) / np.linalg.norm(seq["b"][t])
        assert w_scale < b_scale / 5  # one factor per tensor, not a global one
        self._check_nonfinite_steps_pass(out)

    def test_spike_clip(self):
        steps = _steps(spiky_sequence())
        out, states = _run_scan(optax_stab.spike_clip(10.0, decay=0.9, warmup_steps=10))
        exp, nus = ref_spam(steps, 10.0, 0.9, 10)
        for t in range(STEPS):
            assert_out(out, t, exp[t])
            if nus[t] is not None:
                for k, nu in nus[t].items():
                    np.testing.assert_allclose(states.nu[k][t], nu, rtol=1e-4)
        assert states.clipped_steps[SPIKE_1000X] > states.clipped_steps[SPIKE_1000X - 1]
        self._check_nonfinite_steps_pass(out)


# ---------------------------------------------------------------- clip_by_norm
SHAPE = (3, 4)


def _put(tree, mesh, specs):
    return jax.tree.map(
        lambda x, s: jax.device_put(x, jax.sharding.NamedSharding(mesh, s)),
        tree,
        specs,
    )


@functools.cache
def _clip_fn(scope):
    def run(g, max_norm):
        tx = optax_stab.clip_by_norm(max_norm, scope=scope)
        return tx.update(g, tx.init(g))

    return jax.jit(run)


finite_arrays = st.lists(st.floats(-1e6, 1e6, width=32), min_size=12, max_size=12).map(
    lambda v: np.asarray(v, np.float32).reshape(SHAPE)
)


class ClipByNormTest(parameterized.TestCase):
    @hypothesis.given(a=finite_arrays, b=finite_arrays, max_norm=st.floats(0, 10))
    def test_output_norm_never_exceeds_max_norm(self, a, b, max_norm):
        for scope in ("global", "leaf"):
            u, _ = _clip_fn(scope)({"a": a, "b": b}, max_norm)
            norms = [
                np.linalg.norm(np.asarray(x, np.float64)) for x in (u["a"], u["b"])
            ]
            bound = max_norm * (1 + 1e-6)
            if scope == "global":
                assert np.sqrt(np.sum(np.square(norms))) <= bound
            else:
                assert max(norms) <= bound

    @hypothesis.given(a=finite_arrays, factor=st.floats(1.0, 100.0))
    def test_below_threshold_passes_bit_for_bit(self, a, factor):
        norm = float(np.linalg.norm(a.astype(np.float64)))
        for scope in ("global", "leaf"):
            u, _ = _clip_fn(scope)({"a": a}, norm * factor * (1 + 1e-6))
            np.testing.assert_array_equal(u["a"], a)

    def test_leaf_scope_clips_each_leaf_by_its_own_norm(self):
        g = {"a": jnp.full((4,), 3.0), "b": jnp.full((2,), 0.1)}  # norms 6, 0.14
        u, state = _clip_fn("leaf")(g, 1.0)
        np.testing.assert_allclose(u["a"], np.full(4, 0.5), rtol=1e-6)
        np.testing.assert_array_equal(u["b"], g["b"])
        np.testing.assert_allclose(state.pre_clip_norm["a"], 6.0)
        np.testing.assert_allclose(state.pre_clip_norm["b"], np.sqrt(0.02), rtol=1e-6)
        assert state.clipped_steps == 1

    def test_zero_max_norm_with_zero_gradients_gives_zeros_and_finite_grad(self):
        g = {"a": jnp.zeros(SHAPE)}
        for scope in ("global", "leaf"):
            u, _ = _clip_fn(scope)(g, 0.0)
            np.testing.assert_array_equal(u["a"], np.zeros(SHAPE))
            fn = _clip_fn(scope)
            grad = jax.grad(lambda x, fn=fn: jnp.sum(fn({"a": x}, 0.0)[0]["a"]))
            chex.assert_tree_all_finite(grad(g["a"]))
        u, _ = _clip_fn("global")({"a": jnp.ones(SHAPE)}, 0.0)
        np.testing.assert_array_equal(u["a"], np.zeros(SHAPE))

    def test_nonfinite_step_passes_unchanged_and_is_logged(self):
        tx = optax_stab.clip_by_norm(1.0)
        update = jax.jit(tx.update)
        state = tx.init({"a": jnp.zeros(2), "b": jnp.zeros(2)})
        bad = {"a": jnp.array([INF, 1.0]), "b": jnp.array([5.0, 5.0])}
        u, state = update(bad, state)
        chex.assert_trees_all_equal(u, bad)
        assert np.isinf(state.pre_clip_norm) and state.clipped_steps == 0
        u, state = update({"a": jnp.array([3.0, 4.0]), "b": jnp.zeros(2)}, state)
        np.testing.assert_allclose(u["a"], [0.6, 0.8], rtol=1e-6)
        assert state.pre_clip_norm == 5.0 and state.clipped_steps == 1

    def test_finite_gradient_whose_squares_overflow_is_clipped_to_its_limit(self):
        # Issue 10.5: 3e30**2 overflows float32, the norm 5e30 does not.
        g = {"a": jnp.array([3e30, 0.0]), "b": jnp.array([-4e30])}
        expected = {
            "global": ({"a": [0.6, 0.0], "b": [-0.8]}, 5e30),
            "leaf": ({"a": [1.0, 0.0], "b": [-1.0]}, {"a": 3e30, "b": 4e30}),
        }
        for scope, (want, norm) in expected.items():
            u, state = _clip_fn(scope)(g, 1.0)
            for k in g:
                np.testing.assert_allclose(u[k], want[k], rtol=1e-6)
            got = jax.tree.map(float, state.pre_clip_norm)
            np.testing.assert_allclose(
                jax.tree.leaves(got), jax.tree.leaves(norm), rtol=1e-6
            )
            assert state.clipped_steps == 1

    def test_bf16_gradients_are_clipped_by_their_true_norm(self):
        # 1000 leaves of ones(1000): the true norm is 1000. A bfloat16 sum of
        # squares stalls at 2**18 (optax.tree.norm gives 512 here).
        grads = [jnp.ones(1000, jnp.bfloat16) for _ in range(1000)]
        assert float(_tree.global_norm(grads)) == 1000.0
        tx = optax_stab.clip_by_norm(1.0)
        u, state = tx.update(grads, tx.init(grads))  # eager: jit of 1000 leaves is slow
        assert all(x.dtype == jnp.bfloat16 for x in u)
        out_norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in u))
        np.testing.assert_allclose(out_norm, 1.0, rtol=5e-3)
        np.testing.assert_allclose(state.pre_clip_norm, 1000.0, rtol=5e-3)

    @parameterized.parameters("global", "leaf")
    def test_axis_name_under_shard_map_matches_unsharded(self, scope):
        n = jax.device_count()
        assert n == 8
        mesh = jax.make_mesh((n,), ("x",))
        grads = _at(jax.tree.map(jnp.asarray, spiky_sequence()), 5)
        grads = {"b": jnp.tile(grads["b"], 8)[:16], "w": jnp.tile(grads["w"], (4, 1))}
        specs = {"b": P("x"), "w": P("x", None)}
        state_spec = P() if scope == "global" else {"b": P(), "w": P()}
        tx_full = optax_stab.clip_by_norm(1.0, scope=scope)
        tx_local = optax_stab.clip_by_norm(1.0, scope=scope, axis_name="x")
        expected, full_state = tx_full.update(grads, tx_full.init(grads))

        def local(g):
            u, s = tx_local.update(g, tx_local.init(g))
            return u, s.pre_clip_norm

        sharded = jax.shard_map(
            local, mesh=mesh, in_specs=(specs,), out_specs=(specs, state_spec)
        )
        got, norm = jax.jit(sharded)(_put(grads, mesh, specs))
        chex.assert_trees_all_close(got, expected, rtol=1e-6)
        chex.assert_trees_all_close(norm, full_state.pre_clip_norm, rtol=1e-6)

    def test_adaptive_clippers_accept_axis_name_under_shard_map(self):
        mesh = jax.make_mesh((jax.device_count(),), ("x",))
        seq = jax.tree.map(jnp.asarray, spiky_sequence())
        grads = {"w": jnp.concatenate([seq["w"][:6]] * 2, axis=1)}  # (6, 8, 3)
        spec = {"w": P(None, "x", None)}
        for make in (
            lambda **kw: optax_stab.autoclip(30.0, history=4, **kw),
            lambda **kw: optax_stab.zscore_clip(warmup_steps=2, z_threshold=0.5, **kw),
            lambda **kw: optax_stab.adaptive_tensor_clip(warmup_steps=2, **kw),
        ):
            tx_full, tx_local = make(), make(axis_name="x")
            expected, state = [], tx_full.init(_at(grads, 0))
            for t in range(6):
                u, state = tx_full.update(_at(grads, t), state)
                expected.append(u)

            def local(gs, tx=tx_local):
                def step(s, g):
                    u, s = tx.update(g, s)
                    return s, u

                return jax.lax.scan(step, tx.init(_at(gs, 0)), gs)[1]

            sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec,), out_specs=spec)
            got = jax.jit(sharded)(_put(grads, mesh, spec))
            for t in range(6):
                chex.assert_trees_all_close(_at(got, t), expected[t], rtol=1e-5)


# ------------------------------------------------------------------ spike_clip
def test_spike_clip_never_freezes_a_coordinate_first_active_after_warmup():
    # Coordinate 1 is 0 during warm-up, so its nu is 0: SPAM's rule would clip
    # any later gradient there to sign(g) * sqrt(threshold * 0) = 0 for ever.
    tx = optax_stab.spike_clip(4.0, decay=0.5, warmup_steps=2)
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(2))
    for g in ([1.0, 0.0], [1.0, 0.0]):
        _, state = update(jnp.array(g), state)
    u, state = update(jnp.array([10.0, 7.0]), state)
    # nu[0] = 0.75: 100 > 4 * 0.75 is clipped to sqrt(3); coordinate 1 passes.
    np.testing.assert_allclose(u, [np.sqrt(3.0), 7.0], rtol=1e-6)
    np.testing.assert_allclose(state.nu, [0.5 * 0.75 + 0.5 * 3.0, 24.5], rtol=1e-6)
    assert state.clipped_steps == 1 and state.count == 3


# -------------------------------------------------------- percentile helper
@functools.cache
def _percentile_fn(window):
    def run(values, n, q):
        ring = jax.lax.fori_loop(
            0, n, lambda i, r: _ring.push(r, values[i]), _ring.init_scalar(window)
        )
        return _ring.masked_percentile(ring, q)

    return jax.jit(run)


@hypothesis.given(
    values=st.lists(st.floats(-1e3, 1e3, width=32), min_size=0, max_size=12),
    q=st.floats(0.0, 100.0),
)
def test_masked_percentile_matches_numpy_over_the_filled_slots(values, q):
    window = 7  # 12 pushes wrap the ring
    padded = np.zeros(12, np.float32)
    padded[: len(values)] = values
    got = _percentile_fn(window)(jnp.asarray(padded), len(values), q)
    kept = np.asarray(values, np.float32)[-window:].astype(np.float64)
    expected = np.percentile(kept, q) if len(values) else 0.0
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------ bad hyperparameters
class BadHyperparametersTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("clip_negative", optax_stab.clip_by_norm, {"max_norm": -1.0}, "max_norm"),
        ("clip_nan", optax_stab.clip_by_norm, {"max_norm": NAN}, "max_norm"),
        (
            "clip_scope",
            optax_stab.clip_by_norm,
            {"max_norm": 1.0, "scope": "x"},
            "scope",
        ),
        ("auto_pct", optax_stab.autoclip, {"percentile": 101.0}, "percentile"),
        ("auto_hist", optax_stab.autoclip, {"history": 0}, "history"),
        ("auto_hist_float", optax_stab.autoclip, {"history": 2.0}, "history"),
        ("z_decay", optax_stab.zscore_clip, {"decay": 1.0}, "decay"),
        ("z_thr", optax_stab.zscore_clip, {"z_threshold": 0.0}, "z_threshold"),
        ("z_warm", optax_stab.zscore_clip, {"warmup_steps": 0}, "warmup_steps"),
        ("z_warm_float", optax_stab.zscore_clip, {"warmup_steps": 2.5}, "warmup_steps"),
        ("z_mode", optax_stab.zscore_clip, {"mode": "median"}, "mode"),
        ("z_max", optax_stab.zscore_clip, {"max_norm": 0.0}, "max_norm"),
        ("z_eps", optax_stab.zscore_clip, {"eps": -1.0}, "eps"),
        ("ada_decay", optax_stab.adaptive_tensor_clip, {"decay": -0.1}, "decay"),
        ("ada_rel", optax_stab.adaptive_tensor_clip, {"relative": 0.0}, "relative"),
        (
            "ada_warm",
            optax_stab.adaptive_tensor_clip,
            {"warmup_steps": 0},
            "warmup_steps",
        ),
        (
            "ada_max",
            optax_stab.adaptive_tensor_clip,
            {"warmup_max_norm": NAN},
            "warmup_max_norm",
        ),
        ("spike_thr", optax_stab.spike_clip, {"threshold": 0.0}, "threshold"),
        ("spike_decay", optax_stab.spike_clip, {"decay": 1.5}, "decay"),
        ("spike_warm", optax_stab.spike_clip, {"warmup_steps": -1}, "warmup_steps"),
    )
    def test_rejects(self, factory, kwargs, name):
        with pytest.raises(ValueError, match=f"`{name}`.*got"):
            factory(**kwargs)


# ------------------------------------- range: huge finite and complex gradients
# Issue 10.5: a finite gradient is always clipped to its limit, whatever its
# magnitude; only NaN/Inf is non-finite. Issue 10.4: norms use |z|**2 and a
# complex update stays complex. float32 rounding bounds every closed form
# below to a few 2**-24: rtol 1e-6.
HUGE = {"a": jnp.array([3e30, 0.0]), "b": jnp.array([-4e30])}  # norm 5e30


@pytest.mark.parametrize(
    ("grad", "max_norm", "want"),
    [
        ([3e30, 4e30], 1.0, [0.6, 0.8]),
        ([3e-30, 4e-30], 1e-30, [0.6e-30, 0.8e-30]),  # squares flush to 0
        ([3e38, 0.0], 1.0, [1.0, 0.0]),  # 1 / 3e38 is subnormal
        ([3e30, 4e30], 1e-20, [0.6e-20, 0.8e-20]),  # ratio 2e-51
    ],
)
def test_clip_by_norm_clips_any_finite_gradient_to_its_limit(grad, max_norm, want):
    g = jnp.asarray(grad, jnp.float32)
    for scope in ("global", "leaf"):
        u, state = _clip_fn(scope)({"g": g}, max_norm)
        np.testing.assert_allclose(u["g"], want, rtol=1e-6)
        assert state.clipped_steps == 1


@pytest.mark.parametrize("scope", ["global", "leaf"])
def test_clip_by_norm_of_complex_uses_the_modulus_and_stays_complex(scope):
    g = {"z": jnp.array([3 + 4j, 0j], jnp.complex64)}
    u, state = _clip_fn(scope)(g, 1.0)
    assert u["z"].dtype == jnp.complex64
    np.testing.assert_allclose(u["z"], [0.6 + 0.8j, 0j], rtol=1e-6)
    np.testing.assert_allclose(jax.tree.leaves(state.pre_clip_norm), 5.0)
    u, _ = _clip_fn(scope)(g, 10.0)  # below the limit: bit for bit
    np.testing.assert_array_equal(u["z"], g["z"])


def test_history_clippers_clip_a_huge_finite_step_and_count_it_finite():
    ones = {"a": jnp.array([0.6, 0.0]), "b": jnp.array([-0.8])}  # norm 1
    cases = {
        # median of (1, 1, 5e30) is 1
        "autoclip": optax_stab.autoclip(50.0, history=3),
        # max_norm applies during warm-up
        "zscore_clip": optax_stab.zscore_clip(warmup_steps=5, max_norm=1.0),
        # warm-up: the global norm is clipped at warmup_max_norm
        "adaptive_tensor_clip": optax_stab.adaptive_tensor_clip(warmup_steps=5),
    }
    for name, tx in cases.items():
        update = jax.jit(tx.update)
        state = tx.init(ones)
        for _ in range(2):
            _, state = update(ones, state)
        u, state = update(HUGE, state)
        np.testing.assert_allclose(u["a"], [0.6, 0.0], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(u["b"], [-0.8], rtol=1e-6, err_msg=name)
        assert int(state.clipped_steps) == 1, name
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state)), name
        if "count" in state._fields:
            assert int(state.count) == 3, name  # a finite step


def test_health_monitor_and_spike_guard_see_a_huge_step_as_finite():
    health = optax_stab.health_monitor()
    _, hs = health.update(HUGE, health.init(HUGE))
    np.testing.assert_allclose(float(hs.grad_norm), 5e30, rtol=1e-6)
    np.testing.assert_allclose(float(hs.leaf_norms["b"]), 4e30, rtol=1e-6)
    assert int(hs.nonfinite_leaves) == 0 and int(hs.health_step) == 1
    # spike_guard: after a constant norm-1 history the step is a spike, not a
    # non-finite step; "rescale" scales it to the threshold, 1.1 (mean plus
    # min_relative=0.1 of it, which beats 6 * the floored std 1e-3).
    tx = optax_stab.spike_guard(
        optax.sgd(1.0), action="rescale", warmup_steps=3, watch="grad_norm"
    )
    ones = {"a": jnp.array([0.6, 0.0]), "b": jnp.array([-0.8])}
    update = jax.jit(tx.update)
    state = tx.init(ones)
    for _ in range(4):
        _, state = update(ones, state)
    u, state = update(HUGE, state)
    assert int(state.nonfinite_steps) == 0 and int(state.spike_steps) == 1
    np.testing.assert_allclose(u["a"], [-0.66, 0.0], rtol=1e-6)
    np.testing.assert_allclose(u["b"], [0.88], rtol=1e-6)


def test_spike_clip_after_a_huge_warmup_step_still_clips_that_coordinate():
    # theta 4, decay 0.5, warm-up 1. Squares enter nu clamped at
    # M = finfo.max / (2 * 4) (the docstring's "Range"), so theta * nu stays
    # finite. Reference in float64 with that clamp; without it nu is Inf and
    # coordinate 0 would never be clipped again.
    theta, beta, fmax = 4.0, 0.5, float(np.finfo(np.float32).max)
    ceiling = fmax / (2 * theta)
    tx = optax_stab.spike_clip(theta, decay=beta, warmup_steps=1)
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(2))
    steps = [[1e30, 2.0], [1e30, -100.0], [-1e25, 1.0]]
    nu = np.zeros(2)
    for t, g in enumerate(steps):
        g = np.asarray(g, np.float64)
        cap2 = theta * nu
        spike = (t >= 1) & (nu > 0) & (g**2 > cap2)
        want = np.where(spike, np.sign(g) * np.sqrt(cap2), g)
        nu = beta * nu + (1 - beta) * np.minimum(np.where(spike, cap2, g**2), ceiling)
        u, state = update(jnp.asarray(g, jnp.float32), state)
        np.testing.assert_allclose(u, want, rtol=1e-6, err_msg=f"step {t}")
        np.testing.assert_allclose(state.nu, nu, rtol=1e-6, err_msg=f"step {t}")
    assert int(state.clipped_steps) == 2  # coordinate 0 at steps 1 and 2
