"""The invariant suite: every transform in ``registry.ENTRIES`` obeys the contract.

Checked once here for all transforms (never per module, never by name): the
registry covers every public factory; eval_shape init; jit (every state buffer
donated) == eager with no retrace, stable state shapes and dtypes (also over 50
``lax.scan`` steps); dtype preservation (f32, bf16, mixed) under strict
promotion; vmap and pmap == loop; sharding over an 8-device mesh;
``optax.chain`` with a varying ``loss=`` (a dropped loss fails);
``optax.MultiSteps``; ``optax.inject_hyperparams`` == the plain transform, and
swept by vmap with the value switched mid-run; ``optax.masked``; non-finite
gradients (with and without jit, and under pmap, as ``chex.variants``); and
descent of a convex quadratic when chained before ``optax.sgd``.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_stab
from optax_stab import _tree
from tests import registry

ENTRIES = registry.ENTRIES
IDS = [e.name for e in ENTRIES]
SHAPES = {"w": (16, 6), "b": (24,)}
STEPS = 4


def _params(dtypes=("float32", "float32")):
    dw, db = dtypes
    return {
        "w": jnp.linspace(-1.0, 1.0, 96, dtype=jnp.float32).reshape(16, 6).astype(dw),
        "b": jnp.linspace(0.5, -0.5, 24, dtype=jnp.float32).astype(db),
    }


@functools.cache
def _grad_stack(steps: int, seed: int = 0, dtypes=("float32", "float32")):
    """``steps`` gradient pytrees stacked on axis 0, of varied scale."""
    kw, kb = jax.random.split(jax.random.key(seed))
    scale = (1.0 + jnp.arange(steps, dtype=jnp.float32) % 3)[:, None]
    w = jax.random.normal(kw, (steps, 96)) * scale
    b = jax.random.normal(kb, (steps, 24)) * scale
    return {"w": w.reshape(steps, 16, 6).astype(dtypes[0]), "b": b.astype(dtypes[1])}


def _at(stack, i):
    return jax.tree.map(lambda x: x[i], stack)


def _run(tx, grads_stack, params, steps, update=None, **extra):
    update = update or tx.update
    state = tx.init(params)
    outs = []
    for i in range(steps):
        u, state = update(_at(grads_stack, i), state, params, **extra)
        outs.append(u)
    return outs, state


def _assert_close(a, b, rtol=1e-5, atol=1e-6):
    chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


def _trees_close(a, b, rtol=1e-5, atol=1e-6) -> bool:
    """Whether two trees agree (NaN equal to NaN), as a bool."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(
        np.allclose(
            np.asarray(x, np.float32), np.asarray(y, np.float32), rtol, atol, True
        )
        for x, y in zip(la, lb)
    )


def _entry(name):
    return next(e for e in ENTRIES if e.name == name)


@functools.cache
def _tx(name):
    return _entry(name).make()


@functools.cache
def _reference(name):
    """Eager outputs and states (after each step) on the standard run.

    Shared by the tests that compare a wrapped or compiled run with the plain
    eager one, so each entry's reference is computed once.
    """
    tx = _tx(name)
    params, grads = _params(), _grad_stack(STEPS)
    state, outs, states = tx.init(params), [], []
    for i in range(STEPS):
        u, state = tx.update(_at(grads, i), state, params)
        outs.append(u)
        states.append(state)
    return outs, states


def _named_types(tree, found):
    """Adds the NamedTuple classes nested anywhere in ``tree`` to ``found``."""
    if isinstance(tree, tuple):
        if hasattr(type(tree), "_fields"):
            found.add(type(tree))
        for x in tree:
            _named_types(x, found)
    elif isinstance(tree, dict):
        for x in tree.values():
            _named_types(x, found)
    return found


def test_registry_covers_every_public_factory():
    built = {e.factory for e in ENTRIES}
    states = set()
    for e in ENTRIES:
        tx = e.make()
        assert isinstance(tx, optax.GradientTransformationExtraArgs), e.name
        _named_types(jax.eval_shape(tx.init, _params()), states)
    assert set(registry.EXCLUDED) <= set(optax_stab.__all__)
    for name in optax_stab.__all__:
        obj = getattr(optax_stab, name)
        if isinstance(obj, type):
            assert obj in states, (
                f"{name} is the state of no entry in tests/registry.py"
            )
        elif name in registry.EXCLUDED:
            assert obj not in built, f"{name} has an entry: drop it from EXCLUDED"
        else:
            assert obj in built, (
                f"optax_stab.{name} has no entry in tests/registry.py (add one, or "
                "list it in registry.EXCLUDED with the reason)"
            )


def test_registry_sweeps_every_float_hyperparameter():
    for e in ENTRIES:
        floats = {
            k
            for k, v in e.kwargs.items()
            if isinstance(v, float) and k not in e.static_args
        }
        if floats:
            assert e.sweep is not None, f"{e.name}: sweep one of {sorted(floats)}"
        if e.sweep is not None:
            assert e.sweep[0] in floats, (e.name, e.sweep[0])


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_init_under_eval_shape_matches_init(entry):
    tx = _tx(entry.name)
    params = _params()
    abstract = jax.eval_shape(tx.init, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract, tx.init(params))


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_jit_matches_eager_without_retrace_and_state_is_donated(entry):
    tx = _tx(entry.name)
    params, grads = _params(), _grad_stack(STEPS)
    eager_out, eager_states = _reference(entry.name)
    chex.clear_trace_counter()  # the counter is keyed by code, shared by entries
    # The state is donated, as in a training loop. keep_unused passes fields
    # that update overwrites without reading too, so every buffer of the state
    # must be aliased to an output: init gives every field its own buffer (XLA
    # refuses to donate one buffer twice) and update returns each field in the
    # shape and dtype init gave it (else the buffer is not usable and survives).
    jitted = jax.jit(
        chex.assert_max_traces(tx.update, n=1), donate_argnums=1, keep_unused=True
    )
    state = tx.init(params)
    for i in range(STEPS):
        donated = state
        u, state = jitted(_at(grads, i), state, params)
        alive = [
            jax.tree_util.keystr(k)
            for k, x in jax.tree_util.tree_leaves_with_path(donated)
            if not x.is_deleted()
        ]
        assert not alive, f"state buffers not donated: {alive}"
        _assert_close(u, eager_out[i])
        chex.assert_tree_all_finite(u)
    _assert_close(state, eager_states[-1])
    chex.assert_trees_all_equal_shapes_and_dtypes(state, tx.init(params))


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_fifty_steps_in_scan(entry):
    tx = _tx(entry.name)
    params, grads = _params(), _grad_stack(50)

    def step(state, g):
        u, state = tx.update(g, state, params)
        return state, u

    state, outs = jax.jit(lambda s, gs: jax.lax.scan(step, s, gs))(
        tx.init(params), grads
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(state, tx.init(params))
    chex.assert_tree_all_finite(outs)


DTYPES = {
    "f32": ("float32", "float32"),
    "bf16": ("bfloat16", "bfloat16"),
    "mixed": ("bfloat16", "float32"),
}


@pytest.mark.parametrize("dtypes", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_updates_keep_dtype_under_strict_promotion(entry, dtypes):
    tx = _tx(entry.name)
    params, grads = _params(dtypes), _grad_stack(STEPS, dtypes=dtypes)
    update = jax.jit(tx.update)
    with jax.numpy_dtype_promotion("strict"):
        state0 = tx.init(params)
        state = state0
        for i in range(STEPS):
            g = _at(grads, i)
            u, state = update(g, state, params)
            chex.assert_trees_all_equal_dtypes(u, g)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)
    chex.assert_tree_all_finite(u)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_vmap_and_pmap_match_a_python_loop(entry):
    tx = _tx(entry.name)
    n = jax.device_count()
    params = _params()
    batch_params = jax.tree.map(
        lambda p: jnp.stack([p * (1 + i) for i in range(n)]), params
    )
    batch_grads = [_grad_stack(2, seed=1 + i) for i in range(n)]
    # The loop runs compiled (jit == eager is checked above); one jitted
    # update per entry, shared with the other tests on f32 trees.
    loop = jax.jit(tx.update)
    expected = [
        _run(tx, batch_grads[i], _at(batch_params, i), 2, update=loop) for i in range(n)
    ]
    for mapped in (lambda f: jax.jit(jax.vmap(f)), jax.pmap):
        update = mapped(tx.update)
        state = mapped(tx.init)(batch_params)
        for step in range(2):
            g = jax.tree.map(
                lambda *xs: jnp.stack(xs), *[_at(b, step) for b in batch_grads]
            )
            u, state = update(g, state, batch_params)
            for i in range(n):
                _assert_close(_at(u, i), expected[i][0][step])
        for i in range(n):
            _assert_close(_at(state, i), expected[i][1])


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_sharded_params_keep_sharding_and_match_single_device(entry):
    tx = _tx(entry.name)
    params, grads = _params(), _grad_stack(STEPS)
    expected, _ = _reference(entry.name)
    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    specs = {"w": P("x", None), "b": P("x")}
    with jax.set_mesh(mesh):
        put = lambda tree: jax.tree.map(  # noqa: E731
            lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs
        )
        sp = put(params)
        state0 = jax.jit(tx.init)(sp)
        update = jax.jit(tx.update)
        state = state0
        for i in range(STEPS):
            u, state = update(put(_at(grads, i)), state, sp)
            _assert_close(u, expected[i])
            for leaf, p in zip(jax.tree.leaves(u), jax.tree.leaves(sp)):
                assert leaf.sharding.spec == p.sharding.spec
    # Every per-parameter state buffer is sharded like its parameter, and the
    # update returns the same shardings as init.
    param_specs = {p.shape: tuple(p.sharding.spec) for p in jax.tree.leaves(sp)}
    for a, b in zip(jax.tree.leaves(state0), jax.tree.leaves(state)):
        assert a.sharding.spec == b.sharding.spec, (a.shape, a.sharding, b.sharding)
        for shape, spec in param_specs.items():
            if a.ndim >= len(shape) and a.shape[a.ndim - len(shape) :] == shape:
                got = tuple(a.sharding.spec)[a.ndim - len(shape) :]
                got = got + (None,) * (len(shape) - len(got))
                assert got == spec + (None,) * (len(shape) - len(spec)), (a.shape, got)


# A loss that moves, jumps and turns non-finite, so that a guard dropping it
# (or an optax.chain that did) ends in another state.
LOSSES = (1.5, 0.5, float("nan"), 2.5)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_in_chain_with_adam_and_a_varying_loss(entry):
    tx = _tx(entry.name)
    adam = optax.adam(1e-3)
    chain = optax.chain(tx, adam)
    params, grads = _params(), _grad_stack(STEPS)
    update = jax.jit(chain.update)
    state = chain.init(params)
    got = []
    for i in range(STEPS):
        loss = jnp.float32(LOSSES[i])
        u, state = update(_at(grads, i), state, params, loss=loss)
        got.append(u)
    # Reference: the transform given the loss directly, then adam by hand.
    tx_state, adam_state, tx_outs = tx.init(params), adam.init(params), []
    for i in range(STEPS):
        u, tx_state = tx.update(_at(grads, i), tx_state, params, loss=LOSSES[i])
        tx_outs.append(u)
        u, adam_state = adam.update(u, adam_state, params)
        _assert_close(got[i], u)
    _assert_close(state[0], tx_state)
    # The loss matters exactly for the entries that declare they read it: a
    # guard that dropped it would match the run without loss=.
    outs, states = _reference(entry.name)
    same = _trees_close((tx_outs, tx_state), (outs, states[-1]))
    assert same != entry.reads_loss, "reads_loss is wrong" if same else "loss= read"


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_inside_multisteps(entry):
    tx = _tx(entry.name)
    k = 3
    multi = optax.MultiSteps(tx, every_k_schedule=k)
    params, grads = _params(), _grad_stack(2 * k)
    got, mstate = _run(multi, grads, params, 2 * k, update=jax.jit(multi.update))
    state = tx.init(params)
    for group in range(2):
        mean = jax.tree.map(
            lambda x, g=group: jnp.mean(x[g * k : (g + 1) * k], axis=0), grads
        )
        u, state = tx.update(mean, state, params)
        for j in range(k - 1):
            chex.assert_trees_all_equal(
                got[group * k + j], jax.tree.map(jnp.zeros_like, u)
            )
        _assert_close(got[group * k + k - 1], u, rtol=1e-4, atol=1e-5)
    _assert_close(mstate.inner_opt_state, state, rtol=1e-4, atol=1e-5)


def _injected(entry):
    return optax.inject_hyperparams(entry.factory, static_args=entry.static_args)(
        **entry.kwargs
    )


# Entries with a sweep run inject_hyperparams in the switched test below, whose
# steps before the switch must match the plain transform too.
UNSWEPT = [e for e in ENTRIES if not e.sweep]


@pytest.mark.parametrize("entry", UNSWEPT, ids=[e.name for e in UNSWEPT])
def test_inject_hyperparams_matches_the_plain_transform(entry):
    # Every numeric argument (given or default, not in static_args) becomes a
    # traced hyperparameter: the transform must accept it and act the same.
    injected = _injected(entry)
    params, grads = _params(), _grad_stack(STEPS)
    update = jax.jit(injected.update)
    outs, states = _reference(entry.name)
    state = injected.init(params)
    for i in range(STEPS):
        u, state = update(_at(grads, i), state, params)
        _assert_close(u, outs[i], rtol=1e-4, atol=1e-5)
        _assert_close(state.inner_state, states[i], rtol=1e-4, atol=1e-5)


SWITCH = 2  # the step at which the swept value replaces the entry's own
SWEPT = [e for e in ENTRIES if e.sweep]


@pytest.mark.parametrize("entry", SWEPT, ids=[e.name for e in SWEPT])
def test_inject_hyperparams_switched_mid_run_under_vmap(entry):
    name, values = entry.sweep
    injected = _injected(entry)
    params, grads = _params(), _grad_stack(STEPS)

    def run(v):
        s = injected.init(params)
        outs = []
        for i in range(STEPS):
            if i == SWITCH:
                s = s._replace(hyperparams={**s.hyperparams, name: v})
            u, s = injected.update(_at(grads, i), s, params)
            outs.append(u)
        return outs, s.inner_state

    swept, inner = jax.jit(jax.vmap(run))(jnp.asarray(values, jnp.float32))
    # With bf16 params, inject_hyperparams casts the hyperparameters to bf16.
    bf16 = _params(DTYPES["bf16"])
    g16 = _at(_grad_stack(1, dtypes=DTYPES["bf16"]), 0)
    u16, _ = jax.jit(injected.update)(g16, injected.init(bf16), bf16)
    chex.assert_trees_all_equal_dtypes(u16, g16)
    # Expected: the plain transform up to SWITCH, then the plain transform
    # built with the new value, continuing from that state.
    outs, states = _reference(entry.name)
    changed = False
    for j, v in enumerate(values):
        tx, state, expected = entry.make(**{name: v}), states[SWITCH - 1], []
        for i in range(SWITCH, STEPS):
            u, state = tx.update(_at(grads, i), state, params)
            expected.append(u)
        got = [_at(swept[i], j) for i in range(STEPS)]
        _assert_close(got, outs[:SWITCH] + expected, rtol=1e-4, atol=1e-5)
        _assert_close(_at(inner, j), state, rtol=1e-4, atol=1e-5)
        changed |= not _trees_close((expected, state), (outs[SWITCH:], states[-1]))
    assert changed, f"no value of {name} in the sweep changes the run: pick others"


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_masked_leaves_pass_through(entry):
    tx = _tx(entry.name)
    masked = optax.masked(tx, {"w": True, "b": False})
    params, grads = _params(), _grad_stack(STEPS)
    got, _ = _run(masked, grads, params, STEPS, update=jax.jit(masked.update))
    sub = lambda t: {"w": t["w"]}  # noqa: E731
    state = tx.init(sub(params))
    for i in range(STEPS):
        g = _at(grads, i)
        u, state = tx.update(sub(g), state, sub(params))
        chex.assert_trees_all_equal(got[i]["b"], g["b"])
        _assert_close(got[i]["w"], u["w"])


@functools.cache
def _nonfinite_grads():
    """Six gradients; step 2 has a NaN and step 3 an Inf in one leaf."""
    grads = _grad_stack(6)
    w = grads["w"].at[2, 0, 0].set(jnp.nan).at[3, 0, 0].set(jnp.inf)
    return {"w": w, "b": grads["b"]}


@functools.cache
def _nonfinite_reference(name):
    tx, params, grads = _tx(name), _params(), _nonfinite_grads()
    return _run(tx, grads, params, 6)


class NonfiniteGradientsTest(chex.TestCase):
    """Core invariant under each variant: jit, no jit, and pmap (replicated)."""

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @parameterized.named_parameters(*[(n, n) for n in IDS])
    def test_never_poison_state_or_finite_leaves(self, name):
        tx = _tx(name)
        # pmap replicates the arguments; two devices exercise it as well as 8.
        update = self.variant(tx.update, n_devices=2)
        params, grads = _params(), _nonfinite_grads()
        expected, expected_state = _nonfinite_reference(name)
        state0 = tx.init(params)
        state = state0
        for i in range(6):
            g = _at(grads, i)
            u, state = update(g, state, params)
            chex.assert_trees_all_equal_dtypes(u, g)
            chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)
            if i in (2, 3):
                # The finite leaf is never turned into NaN or Inf by the bad one.
                chex.assert_tree_all_finite(u["b"])
            else:
                chex.assert_tree_all_finite(u)
            _assert_close(u, expected[i])
        _assert_close(state, expected_state)
        # Nothing non-finite was stored in the state that later steps read.
        chex.assert_tree_all_finite(
            [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
        )


def _large_leaf_steps():
    """Four steps on a tree with a leaf of ``_tree.SMALL_LEAF`` elements.

    XLA:CPU reduces a leaf that large in one fused kernel, whose ``max``
    drops NaN (jaxlib 0.10.2); the small-leaf tests above never reach it.
    Step 1 has a NaN in the large leaf's last element, step 2 an Inf in its
    first; steps 0 and 3 are finite.
    """
    n = _tree.SMALL_LEAF
    ramp = jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32)
    params = {"big": 0.5 * ramp[::-1], "b": jnp.full((5,), 0.1)}
    steps = [
        {"big": (1.0 + 0.5 * i) * ramp, "b": jnp.full((5,), 0.2)} for i in range(4)
    ]
    steps[1]["big"] = steps[1]["big"].at[-1].set(jnp.nan)
    steps[2]["big"] = steps[2]["big"].at[0].set(jnp.inf)
    return params, steps


@pytest.mark.parametrize("entry", registry.ENTRIES, ids=lambda e: e.name)
def test_nonfinite_in_a_large_leaf_never_poisons_the_state(entry):
    tx = optax.with_extra_args_support(entry.make())
    params, steps = _large_leaf_steps()
    update = jax.jit(tx.update)
    state = tx.init(params)
    for i, g in enumerate(steps):
        u, state = update(g, state, params, loss=jnp.float32(1.0))
        chex.assert_tree_all_finite(u["b"])
        if i in (0, 3):
            chex.assert_tree_all_finite(u)
    chex.assert_tree_all_finite(
        [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    )


# ------------------------------------------------------------------ descent
# Minimise 0.5 * sum(h * (x - x_star)^2) over the suite's tree; curvatures h
# in [0.5, 2]; start and optimum inside [-0.45, 0.45] (clip_weights' box).
_H = {
    "w": jnp.linspace(0.5, 2.0, 96, dtype=jnp.float32).reshape(16, 6),
    "b": jnp.linspace(2.0, 0.5, 24, dtype=jnp.float32),
}
_X0 = jax.tree.map(lambda p, c: c * p, _params(), {"w": 0.45, "b": 0.9})
_XSTAR = {"w": -0.2 * _params()["w"][::-1], "b": jnp.full((24,), 0.3)}


def _quadratic(x):
    return 0.5 * sum(
        jnp.sum(h * (a - s) ** 2)
        for a, s, h in zip(
            jax.tree.leaves(x), jax.tree.leaves(_XSTAR), jax.tree.leaves(_H)
        )
    )


def _closed_form_sgd_ratio(lr, steps):
    """Final / initial loss of plain SGD: each error shrinks by (1 - lr h)."""
    h = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(_H)])
    e0 = np.concatenate(
        [
            np.asarray(a - s).ravel()
            for a, s in zip(*map(jax.tree.leaves, (_X0, _XSTAR)))
        ]
    )
    return np.sum(h * e0**2 * (1 - lr * h) ** (2 * steps)) / np.sum(h * e0**2)


def _descend(tx, lr, steps):
    """Losses (steps + 1) and parameters after each step of tx then sgd(lr)."""
    opt = optax.chain(tx, optax.sgd(lr))

    def step(carry, _):
        x, s = carry
        loss, g = jax.value_and_grad(_quadratic)(x)
        u, s = opt.update(g, s, x, loss=loss)
        x = optax.apply_updates(x, u)
        return (x, s), (loss, x)

    (x, _), (losses, xs) = jax.jit(
        lambda: jax.lax.scan(step, (_X0, opt.init(_X0)), None, length=steps)
    )()
    return np.append(np.asarray(losses), float(_quadratic(x))), xs


DESCENTS = sorted({e.descent[:3] for e in ENTRIES})


@pytest.mark.parametrize("lr, steps, max_ratio", DESCENTS)
def test_descent_bound_fails_a_stalled_transform(lr, steps, max_ratio):
    # The bound is a real margin: SGD with the steps scaled by 0.1 misses it.
    assert _closed_form_sgd_ratio(lr, steps) < max_ratio
    assert _closed_form_sgd_ratio(0.1 * lr, steps) > max_ratio


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_descends_a_convex_quadratic_before_sgd(entry):
    d = entry.descent
    losses, xs = _descend(entry.make(), d.lr, d.steps)
    chex.assert_tree_all_finite(losses)
    assert losses[-1] <= d.max_ratio * losses[0], losses[[0, -1]]
    if d.monotone:
        rises = np.diff(losses) / losses[0]
        assert np.all(rises <= 1e-6), f"loss rose by {rises.max():.2e} of its start"
    if d.like is not None:
        # No spike on this smooth descent: act exactly like ``like``.
        _, like_xs = _descend(d.like, d.lr, d.steps)
        _assert_close(xs, like_xs)
