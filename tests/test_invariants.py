"""The invariant suite: every transform in ``registry.ENTRIES`` obeys the contract.

Checked once here for all transforms (never per module, never by name):
eval_shape init, jit (state donated) == eager with no retrace, stable state
shapes and dtypes
(also over 50 ``lax.scan`` steps), dtype preservation (f32, bf16, mixed) under
strict promotion, vmap and pmap == loop, sharding over an 8-device mesh,
``optax.chain`` with ``loss=``, ``optax.MultiSteps``, ``optax.inject_hyperparams``
swept by vmap, ``optax.masked``, and non-finite gradients.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

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


@functools.cache
def _tx(name):
    return next(e for e in ENTRIES if e.name == name).make()


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_init_under_eval_shape_matches_init(entry):
    tx = _tx(entry.name)
    params = _params()
    abstract = jax.eval_shape(tx.init, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract, tx.init(params))


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_jit_matches_eager_without_retrace_and_state_is_stable(entry):
    tx = _tx(entry.name)
    params, grads = _params(), _grad_stack(STEPS)
    eager_out, eager_state = _run(tx, grads, params, STEPS)
    chex.clear_trace_counter()  # the counter is keyed by code, shared by entries
    # The state is donated, as in a training loop: init must give every field
    # its own buffer (XLA refuses to donate one buffer twice).
    jitted = jax.jit(chex.assert_max_traces(tx.update, n=1), donate_argnums=1)
    jit_out, jit_state = _run(tx, grads, params, STEPS, update=jitted)
    _assert_close(jit_out, eager_out)
    _assert_close(jit_state, eager_state)
    chex.assert_trees_all_equal_shapes_and_dtypes(jit_state, tx.init(params))
    chex.assert_tree_all_finite(jit_out)


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
    expected = [_run(tx, batch_grads[i], _at(batch_params, i), 2) for i in range(n)]
    for mapped in (jax.vmap, jax.pmap):
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
    expected, _ = _run(tx, grads, params, STEPS)
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


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_in_chain_with_adam_and_loss(entry):
    tx = _tx(entry.name)
    adam = optax.adam(1e-3)
    chain = optax.chain(tx, adam)
    params, grads = _params(), _grad_stack(STEPS)
    got, _ = _run(chain, grads, params, STEPS, update=jax.jit(chain.update), loss=1.5)
    state, adam_state = tx.init(params), adam.init(params)
    for i in range(STEPS):
        u, state = tx.update(_at(grads, i), state, params, loss=1.5)
        u, adam_state = adam.update(u, adam_state, params)
        _assert_close(got[i], u)


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


@pytest.mark.parametrize(
    "entry", [e for e in ENTRIES if e.sweep], ids=[e.name for e in ENTRIES if e.sweep]
)
def test_inject_hyperparams_sweep_under_vmap(entry):
    name, values = entry.sweep
    injected = optax.inject_hyperparams(entry.factory, static_args=entry.static_args)(
        **entry.kwargs
    )
    params, grads = _params(), _grad_stack(STEPS)
    state = injected.init(params)
    vals = jnp.asarray(values, jnp.float32)

    def run(v):
        s = state._replace(hyperparams={**state.hyperparams, name: v})
        outs = []
        for i in range(STEPS):
            u, s = injected.update(_at(grads, i), s, params)
            outs.append(u)
        return outs

    swept = jax.jit(jax.vmap(run))(vals)
    # With bf16 params, inject_hyperparams casts the hyperparameters to bf16.
    bf16 = _params(DTYPES["bf16"])
    g16 = _at(_grad_stack(1, dtypes=DTYPES["bf16"]), 0)
    u16, _ = jax.jit(injected.update)(g16, injected.init(bf16), bf16)
    chex.assert_trees_all_equal_dtypes(u16, g16)
    for j, v in enumerate(values):
        expected, _ = _run(entry.make(**{name: v}), grads, params, STEPS)
        for i in range(STEPS):
            _assert_close(_at(swept[i], j), expected[i], rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_nonfinite_gradients_never_poison_state_or_finite_leaves(entry):
    tx = _tx(entry.name)
    params, grads = _params(), _grad_stack(6)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for i in range(6):
        g = _at(grads, i)
        if i in (2, 3):
            bad = jnp.nan if i == 2 else jnp.inf
            g = {"w": g["w"].at[0, 0].set(bad), "b": g["b"]}
        u, state = update(g, state, params)
        if i in (2, 3):
            # The finite leaf is never turned into NaN or Inf by the bad one.
            chex.assert_tree_all_finite(u["b"])
        else:
            chex.assert_tree_all_finite(u)
    # Nothing non-finite was stored in the state that later steps read.
    chex.assert_tree_all_finite(
        [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    )
