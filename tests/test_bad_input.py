"""The bad-input and fault matrix: every registry entry against each kind below.

Each case asserts the documented behaviour (a clear error at construction or
``init``, or a counted, documented action at run time), not merely "no crash".
The rules checked are stated in :mod:`optax_stab._validate` (leaf dtypes, tree
structure, infinite hyperparameters) and in each transform's docstring.

KINDS (kind: where it is checked)
  1. NaN gradient leaf: test_invariants::test_nonfinite_gradients_never_poison_*,
     and the soak below (#27)
  2. Inf gradient leaf: test_invariants::test_nonfinite_gradients_never_poison_*
  3. overflow (finite 1e30 in float32): test_overflowing_gradient_*
  4. denormal gradients (1e-40): test_denormal_and_zero_gradients
  5. zero gradients: test_denormal_and_zero_gradients
  6. empty tree ``{}``: test_empty_and_none_trees
  7. all-None tree ``{"a": None}``: test_empty_and_none_trees
  8. None leaf next to an array leaf: test_empty_and_none_trees
  9. scalar leaf (shape ``()``): test_scalar_and_zero_size_leaves
 10. zero-size leaf (shape ``(0, 3)``): test_scalar_and_zero_size_leaves
 11. int32 leaf: test_int_and_bool_leaves_raise_naming_the_leaf
 12. bool leaf: test_int_and_bool_leaves_raise_naming_the_leaf
 13. complex64 leaf: test_complex_leaves_stay_complex_or_raise
 14. bfloat16 leaves: test_invariants::test_updates_keep_dtype_under_strict_promotion
 15. float16 leaves: test_float16_leaves
 16. structure mismatch (renamed key): test_structure_and_shape_mismatch
 17. shape mismatch ((1, 3) against (2, 3)): test_structure_and_shape_mismatch
 18. bad hyperparameter (NaN): test_nan_hyperparameter_is_rejected_by_name
 19. infinite hyperparameter: test_infinite_hyperparameter_*, test_issue_*
 20. NaN loss: test_nonfinite_loss
 21. Inf loss: test_nonfinite_loss
 22. missing loss: test_missing_loss
 23. counters near 2**31: test_counters_saturate_near_int32_max
 24. donated state: test_invariants::test_jit_matches_eager_* (donate_argnums=1)
 25. vmap members independent: test_vmap_members_are_independent
 26. checkpoint round trip (state -> numpy -> state): test_numpy_round_trip_*
 27. long lax.scan soak, counters equal the injected faults: test_soak_*
 28. a guard's ``inner`` (or ``filter``) that is not a transformation:
     test_wrapped_transform_must_be_a_transformation
 29. masked leaves (optax.masked): test_invariants::test_masked_leaves_pass_through
"""

from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_stab
from tests import registry

ENTRIES = registry.ENTRIES
IDS = [e.name for e in ENTRIES]
INT32_MAX = 2**31 - 1


class Traits(NamedTuple):
    """What the documentation promises for one registry entry.

    Attributes:
        ordered: Needs an ordering of values: complex leaves raise TypeError.
        complex_ok: Complex leaves are kept complex (False: TypeError, either
            for ``ordered`` or for a real ``accumulator_dtype``).
        needs_params: ``update`` reads ``params`` (a zero gradient need not
            give a zero update).
        watches_loss: Acts on a non-finite ``loss=`` (guards).
        ours: Built by optax_stab (the schedule entry is optax's
            ``scale_by_schedule``, which checks no leaves).
        tree: What a gradient tree unlike the params does: ``"checked"``
            (per-leaf state or reads params: ValueError naming the path),
            ``"any"`` (tree-wide state only: any tree is processed as given),
            ``"inner"`` (a guard: the inner optax transform decides).
        soak: ``(field, counts)``: a counter and what it counts, ``"finite"``
            (steps with finite gradients) or ``"bad"`` (steps with a
            non-finite gradient or loss); ``None`` if it has no such counter.
    """

    ordered: bool = False
    complex_ok: bool = True
    needs_params: bool = False
    watches_loss: bool = False
    ours: bool = True
    soak: tuple[str, str] | None = None
    tree: str = "checked"


_ORDERED = Traits(ordered=True, complex_ok=False)
TRAITS = {
    "ema_smoothing": Traits(soak=("count", "finite")),
    "ema_smoothing_bf16_acc": Traits(complex_ok=False, soak=("count", "finite")),
    "moving_average": Traits(),
    "gaussian_smoothing": Traits(),
    "fir_smoothing": Traits(),
    "windowed_median": _ORDERED,
    "windowed_median_bf16_acc": _ORDERED,
    "amplify_slow": Traits(soak=("count", "finite")),
    "amplify_slow_median": _ORDERED,
    "clip_by_norm": Traits(tree="any"),
    "clip_by_norm_leaf": Traits(),
    "autoclip": Traits(tree="any"),
    "zscore_clip": Traits(tree="any", soak=("count", "finite")),
    "zscore_clip_mean_capped": Traits(tree="any", soak=("count", "finite")),
    "adaptive_tensor_clip": Traits(soak=("count", "finite")),
    "spike_clip": Traits(ordered=True, complex_ok=False, soak=("count", "finite")),
    "sign_power": _ORDERED._replace(tree="any"),
    "sign_sqrt_amplification": _ORDERED._replace(tree="any"),
    "clip_weights": Traits(ordered=True, complex_ok=False, needs_params=True),
    "add_l1_penalty": Traits(ordered=True, complex_ok=False, needs_params=True),
    "inverse_sqrt_decay": Traits(ours=False, tree="any"),
    "guard_nonfinite": Traits(
        watches_loss=True, tree="inner", soak=("nonfinite_steps", "bad")
    ),
    "spike_guard_skip": Traits(
        watches_loss=True, tree="inner", soak=("nonfinite_steps", "bad")
    ),
    "spike_guard_rescale": Traits(
        watches_loss=True, tree="inner", soak=("nonfinite_steps", "bad")
    ),
    "spike_guard_reset": Traits(
        watches_loss=True, tree="inner", soak=("nonfinite_steps", "bad")
    ),
    "guard_nonfinite_of_spike_guard": Traits(
        watches_loss=True, tree="inner", soak=("nonfinite_steps", "bad")
    ),
    "stabilize": Traits(
        watches_loss=True, tree="inner", soak=("nonfinite_steps", "bad")
    ),
    "health_monitor": Traits(soak=("health_step", "finite")),
}
OURS = [e for e in ENTRIES if TRAITS[e.name].ours]
COUNTERS = {
    "count",
    "clipped_steps",
    "nonfinite_steps",
    "consecutive_nonfinite",
    "applied_nonfinite_steps",
    "spike_steps",
    "consecutive_spikes",
    "accepted_steps",
    "applied_spike_steps",
    "health_step",
}


def test_every_registry_entry_has_traits():
    assert sorted(TRAITS) == sorted(IDS)


def _params():
    return {
        "w": jnp.array([[0.3, -0.2, 0.1], [0.05, -0.4, 0.25]], jnp.float32),
        "b": jnp.array([0.2, -0.1, 0.3], jnp.float32),
    }


def _grads(scale=1.0):
    return {
        "w": scale * jnp.array([[0.5, -1.0, 0.25], [2.0, -0.75, 1.5]], jnp.float32),
        "b": scale * jnp.array([-0.5, 1.0, 0.125], jnp.float32),
    }


LOSS = jnp.float32(1.0)


@functools.cache
def _tx(name):
    return next(e for e in ENTRIES if e.name == name).make()


@functools.cache
def _step(name):
    """The entry's update, jitted once for the base tree (``_params``)."""
    tx = _tx(name)
    return jax.jit(lambda g, s, p, loss: tx.update(g, s, p, loss=loss))


def _floats(tree):
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]


def _assert_finite(tree):
    for x in _floats(tree):
        assert bool(jnp.all(jnp.isfinite(x))), tree


def _norm(tree):
    return float(
        np.sqrt(
            sum(np.sum(np.square(np.asarray(x, np.float64))) for x in _floats(tree))
        )
    )


# ------------------------------------------------------------- 3. overflow
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_overflowing_gradient_gives_finite_output(entry):
    # A finite 1e30 is a finite gradient: nothing may turn it into NaN or Inf.
    params = _params()
    g = _grads()
    g = {"w": g["w"].at[0, 0].set(1e30), "b": g["b"]}
    u, _ = _step(entry.name)(g, _tx(entry.name).init(params), params, LOSS)
    _assert_finite(u)


@pytest.mark.parametrize("name", ["clip_by_norm", "clip_by_norm_leaf"])
def test_overflowing_gradient_is_clipped_to_the_limit(name):
    params, g = _params(), _grads()
    g = {"w": g["w"].at[0, 0].set(1e30), "b": g["b"]}
    u, _ = _step(name)(g, _tx(name).init(params), params, LOSS)
    limit = next(e for e in ENTRIES if e.name == name).kwargs["max_norm"]
    # Clipped to the limit, not passed through and not zeroed: the 1e30 leaf
    # dominates, so in both scopes the "w" leaf's norm is the limit (global:
    # b's share of the tree norm is ~1e-30 of it).
    np.testing.assert_allclose(_norm(u["w"]), limit, rtol=1e-5)


# ------------------------------------------------------- 4, 5. tiny values
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_denormal_and_zero_gradients(entry):
    tx, step, params = _tx(entry.name), _step(entry.name), _params()
    state = tx.init(params)
    denormal = jax.tree.map(lambda x: jnp.full_like(x, 1e-40), params)
    for _ in range(2):
        u, state = step(denormal, state, params, LOSS)
        _assert_finite(u)
        _assert_finite(state)
    zeros = jax.tree.map(jnp.zeros_like, params)
    u, state = step(zeros, tx.init(params), params, LOSS)
    _assert_finite(state)
    if TRAITS[entry.name].needs_params:
        _assert_finite(u)
    else:  # zero in, exactly zero out: no 0/0 anywhere
        chex.assert_trees_all_equal(u, zeros)


# --------------------------------------------------------- 6, 7, 8. trees
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_empty_and_none_trees(entry):
    tx = _tx(entry.name)
    b = jnp.array([0.5, -1.0], jnp.float32)
    for tree in ({}, {"a": None}, {"a": None, "b": b}):
        state = tx.init(tree)
        for _ in range(2):
            u, new_state = tx.update(tree, state, tree, loss=LOSS)
            chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
            state = new_state
        assert jax.tree.structure(u) == jax.tree.structure(tree)
        if "b" in tree:
            _assert_finite(u)
            chex.assert_trees_all_equal_shapes_and_dtypes(u, tree)


# --------------------------------------------------------- 9, 10. shapes
def _two_steps_keep_shapes_and_dtypes(tx, grads, params):
    """Two updates: state and output keep their shapes and dtypes, all finite."""
    state = tx.init(params)
    for _ in range(2):
        u, new_state = tx.update(grads, state, params, loss=LOSS)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        state = new_state
    chex.assert_trees_all_equal_shapes_and_dtypes(u, grads)
    _assert_finite(u)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_scalar_and_zero_size_leaves(entry):
    tx = _tx(entry.name)
    params = {"s": jnp.float32(0.25), "e": jnp.zeros((0, 3)), "b": _params()["b"]}
    grads = {"s": jnp.float32(-0.5), "e": jnp.zeros((0, 3)), "b": _grads()["b"]}
    _two_steps_keep_shapes_and_dtypes(tx, grads, params)


# ---------------------------------------------------------- 11, 12. dtypes
@pytest.mark.parametrize("dtype", ["int32", "bool"])
@pytest.mark.parametrize("entry", OURS, ids=[e.name for e in OURS])
def test_int_and_bool_leaves_raise_naming_the_leaf(entry, dtype):
    # The library's rule (optax_stab._validate): a non-float leaf is a
    # TypeError at init naming its path; frozen leaves go through optax.masked.
    tree = {"b": _params()["b"], "step": jnp.ones(3, dtype)}
    with pytest.raises(TypeError, match=rf"\['step'\] has dtype {dtype}"):
        _tx(entry.name).init(tree)
    masked = optax.masked(_tx(entry.name), {"b": True, "step": False})
    u, _ = masked.update(tree, masked.init(tree), tree, loss=LOSS)
    chex.assert_trees_all_equal(u["step"], tree["step"])


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_complex_leaves_stay_complex_or_raise(entry):
    tx, traits = _tx(entry.name), TRAITS[entry.name]
    x, y = _grads(0.01)["w"], _grads(0.02)["b"].reshape(1, 3) * jnp.ones((2, 1))
    params = {"w": (_params()["w"] * (1 + 1j)).astype(jnp.complex64)}
    if not traits.complex_ok:
        with pytest.raises(TypeError, match=r"\['w'\] has dtype complex64"):
            tx.init(params)
        return
    state = tx.init(params)

    def first(g):
        return tx.update({"w": g}, state, params, loss=LOSS)[0]["w"]

    z = first((x + 1j * y).astype(jnp.complex64))
    assert z.dtype == jnp.complex64
    # Small gradients on a fresh state: every complex-capable entry is then a
    # real-coefficient linear map (a filter, an unclipped clipper, a scaled
    # SGD step), so the imaginary part is transformed like the real one.
    re_x = first(x.astype(jnp.complex64))
    re_y = first(y.astype(jnp.complex64))
    np.testing.assert_allclose(z, re_x + 1j * re_y, rtol=1e-5, atol=1e-7)
    assert float(jnp.max(jnp.abs(z.imag))) > 0


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_float16_leaves(entry):
    tx = _tx(entry.name)
    params = jax.tree.map(lambda x: x.astype(jnp.float16), _params())
    grads = jax.tree.map(lambda x: x.astype(jnp.float16), _grads())
    _two_steps_keep_shapes_and_dtypes(tx, grads, params)


# ------------------------------------------------------ 16, 17. structure
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_structure_and_shape_mismatch(entry):
    tx, params, tree = _tx(entry.name), _params(), TRAITS[entry.name].tree
    state = tx.init(params)
    g = _grads()
    renamed = {"v": g["w"], "b": g["b"]}
    reshaped = {"w": g["w"][:1], "b": g["b"]}
    if tree == "checked":
        with pytest.raises(ValueError, match=r"\['v'\]"):
            tx.update(renamed, state, params, loss=LOSS)
        with pytest.raises(ValueError, match=r"\['w'\] has shape \(1, 3\)"):
            tx.update(reshaped, state, params, loss=LOSS)
    elif tree == "any":  # tree-wide state only: the tree given is processed
        for other in (renamed, reshaped):
            u, s = tx.update(other, state, params, loss=LOSS)
            chex.assert_trees_all_equal_shapes_and_dtypes(u, other)
            chex.assert_trees_all_equal_shapes_and_dtypes(s, state)
            _assert_finite(u)
    else:  # a guard: its inner optax.sgd(momentum) rejects another tree
        with pytest.raises(ValueError):
            tx.update(renamed, state, params, loss=LOSS)


# ------------------------------------------------------ 18, 19. hyperparams
SWEPT = [e for e in ENTRIES if e.sweep is not None]


@pytest.mark.parametrize("entry", SWEPT, ids=[e.name for e in SWEPT])
def test_nan_hyperparameter_is_rejected_by_name(entry):
    name = entry.sweep[0]
    with pytest.raises(ValueError, match=rf"`{name}` must be .* got nan"):
        entry.make(**{name: float("nan")})


@pytest.mark.parametrize("entry", SWEPT, ids=[e.name for e in SWEPT])
def test_infinite_hyperparameter_matches_the_stated_range(entry):
    # Rejected: the message's range excludes inf. Accepted: the range says
    # "inf]" and every result stays finite.
    name = entry.sweep[0]
    try:
        tx = entry.make(**{name: float("inf")})
    except ValueError as e:
        assert f"`{name}`" in str(e) and not re.search(r"inf\]", str(e)), e
        return
    with pytest.raises(ValueError, match=r"inf\]"):
        entry.make(**{name: -1.0})
    params = _params()
    state = tx.init(params)
    for i in range(3):
        u, state = tx.update(_grads(1.0 + i), state, params, loss=LOSS)
        _assert_finite(u)
        _assert_finite(state)


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax_stab.sign_power(0.5, threshold=math.inf),
        lambda: optax_stab.sign_sqrt_amplification(threshold=math.inf),
        lambda: optax_stab.amplify_slow(strength=math.inf),
        lambda: optax_stab.add_l1_penalty(strength=math.inf),
        lambda: optax_stab.inverse_sqrt_decay(0.5, math.inf, 10),
        lambda: optax_stab.inverse_sqrt_decay(0.5, 1.0, math.inf),
        lambda: optax_stab.spike_clip(threshold=math.inf),
        lambda: optax_stab.clip_weights(math.inf),
    ],
    ids=[
        "sign_power",
        "sign_sqrt",
        "amplify_slow",
        "add_l1",
        "inv_sqrt_alpha",
        "inv_sqrt_T",
        "spike_clip",
        "clip_weights",
    ],
)
def test_issue_infinite_hyperparameters_are_rejected(make):
    with pytest.raises(ValueError, match=r"must be in [\[(][^,]*, inf\), got inf"):
        make()


def test_infinite_limits_that_mean_off_pass_gradients_unchanged():
    params, g = _params(), _grads(100.0)
    for tx in (
        optax_stab.clip_by_norm(math.inf),
        optax_stab.clip_by_norm(math.inf, scope="leaf"),
        optax_stab.zscore_clip(max_norm=math.inf, warmup_steps=2),
        optax_stab.adaptive_tensor_clip(warmup_max_norm=math.inf, warmup_steps=3),
    ):
        u, _ = tx.update(g, tx.init(params), params)
        chex.assert_trees_all_equal(u, g)


# ------------------------------------------------------ 20, 21, 22. loss
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_nonfinite_loss(entry, bad):
    tx, step, params = _tx(entry.name), _step(entry.name), _params()
    state = tx.init(params)
    u_bad, s_bad = step(_grads(), state, params, jnp.float32(bad))
    if TRAITS[entry.name].watches_loss:
        # Zero update, inner state untouched, counted.
        chex.assert_trees_all_equal(u_bad, jax.tree.map(jnp.zeros_like, params))
        chex.assert_trees_all_equal(s_bad.inner_state, state.inner_state)
        assert int(s_bad.nonfinite_steps) == 1
    else:  # the loss is not read
        u_ok, s_ok = step(_grads(), state, params, LOSS)
        chex.assert_trees_all_equal((u_bad, s_bad), (u_ok, s_ok))


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_missing_loss(entry):
    # Without loss= the transform runs on gradients alone; on a fresh state
    # (guards still in warm-up) it equals the step given a finite loss.
    tx, params = _tx(entry.name), _params()
    state = tx.init(params)
    u, s = tx.update(_grads(), state, params)
    u_loss, _ = _step(entry.name)(_grads(), state, params, LOSS)
    chex.assert_trees_all_close(u, u_loss, rtol=1e-6)
    chex.assert_trees_all_equal_shapes_and_dtypes(s, state)
    if TRAITS[entry.name].watches_loss:
        assert int(s.nonfinite_steps) == 0


# --------------------------------------------------------- 23. counters
def _is_counter(path, x):
    key = path[-1] if path else None
    return getattr(key, "name", None) in COUNTERS and x.dtype == jnp.int32


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_counters_saturate_near_int32_max(entry):
    tx, step, params = _tx(entry.name), _step(entry.name), _params()
    start = INT32_MAX - 1
    state = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.full_like(x, start) if _is_counter(p, x) else x,
        tx.init(params),
    )
    nan = {"w": _grads()["w"].at[0, 0].set(jnp.nan), "b": _grads()["b"]}
    for g in (_grads(), nan, _grads(2.0), nan):
        _, state = step(g, state, params, LOSS)
    found = {
        p[-1].name: int(x)
        for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
        if _is_counter(p, x)
    }
    # Saturating, never wrapping to negative values: a counter that advanced
    # twice from 2**31 - 2 sits at 2**31 - 1. The ``consecutive_*`` run
    # lengths are documented to drop to 0 after an applied step.
    for key, c in found.items():
        low = 0 if key.startswith("consecutive_") else start
        assert low <= c <= INT32_MAX, found
    found = list(found.values())
    if TRAITS[entry.name].soak is not None:
        assert INT32_MAX in found, found


# ------------------------------------------------------- 25. vmap members
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_vmap_members_are_independent(entry):
    # Three members in one vmapped update; member 1 gets a NaN gradient on the
    # second step. Members 0 and 2 must equal their own unbatched runs.
    tx, step, params = _tx(entry.name), _step(entry.name), _params()
    scales = jnp.array([1.0, 2.0, 0.5], jnp.float32)
    vstep = jax.jit(
        jax.vmap(lambda g, s: tx.update(g, s, params, loss=LOSS), in_axes=(0, 0))
    )
    vstate = jax.vmap(lambda _: tx.init(params))(scales)
    outs = []
    for t in range(3):
        g = jax.vmap(_grads)(scales * (1 + t))
        if t == 1:
            g = {"w": g["w"].at[1, 0, 0].set(jnp.nan), "b": g["b"]}
        u, vstate = vstep(g, vstate)
        outs.append(u)
    for m in (0, 2):
        state = tx.init(params)
        for t in range(3):
            u, state = step(_grads(float(scales[m]) * (1 + t)), state, params, LOSS)
            got = jax.tree.map(lambda x, m=m: x[m], outs[t])
            chex.assert_trees_all_close(got, u, rtol=1e-5, atol=1e-7)
        got_state = jax.tree.map(lambda x, m=m: x[m], vstate)
        chex.assert_trees_all_close(got_state, state, rtol=1e-5, atol=1e-7)
    _assert_finite(jax.tree.map(lambda x: x[1], vstate))


# ---------------------------------------------------- 26. checkpointing
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_numpy_round_trip_continues_identically(entry):
    tx, step, params = _tx(entry.name), _step(entry.name), _params()
    state = tx.init(params)
    for t in range(2):
        _, state = step(_grads(1.0 + t), state, params, LOSS)
    saved = jax.device_get(state)  # what a checkpoint writes: numpy arrays
    assert all(isinstance(x, np.ndarray | np.generic) for x in jax.tree.leaves(saved))
    restored = jax.tree.map(jnp.asarray, saved)
    chex.assert_trees_all_equal_shapes_and_dtypes(restored, state)
    a, b = state, restored
    for t in range(2, 4):
        ua, a = step(_grads(1.0 + t), a, params, LOSS)
        ub, b = step(_grads(1.0 + t), b, params, LOSS)
        chex.assert_trees_all_equal((ua, a), (ub, b))


# ------------------------------------------------------------ 27. soak
SOAK_STEPS = 2000
SOAKED = [e for e in ENTRIES if TRAITS[e.name].soak is not None]


@pytest.mark.parametrize("entry", SOAKED, ids=[e.name for e in SOAKED])
def test_soak_counters_equal_injected_faults(entry):
    tx, params = _tx(entry.name), _params()
    field, counts = TRAITS[entry.name].soak
    steps = np.arange(SOAK_STEPS)
    bad_grad = steps % 7 == 3
    bad_loss = steps % 11 == 5

    def body(state, i):
        g = _grads(1.0 + 0.25 * jnp.sin(i.astype(jnp.float32)))
        g = {"w": jnp.where(i % 7 == 3, jnp.nan, g["w"]), "b": g["b"]}
        loss = jnp.where(i % 11 == 5, jnp.inf, 1.0 + 0.01 * jnp.cos(i / 3.0))
        u, state = tx.update(g, state, params, loss=loss.astype(jnp.float32))
        return state, jnp.all(jnp.isfinite(u["b"]))

    state, b_finite = jax.jit(lambda s: jax.lax.scan(body, s, jnp.arange(SOAK_STEPS)))(
        tx.init(params)
    )
    expected = (~bad_grad).sum() if counts == "finite" else (bad_grad | bad_loss).sum()
    # The outermost counter (a nested guard's inner one counts what reached it).
    if field in getattr(state, "_fields", ()):
        counter = getattr(state, field)
    else:
        counter = optax.tree.get(state, field)
    assert int(counter) == int(expected)
    assert bool(jnp.all(b_finite))  # the finite leaf was never poisoned
    _assert_finite(state)  # the last step is finite: so is every statistic


# ------------------------------------------------------ 28. wrapped inner
@pytest.mark.parametrize(
    "make",
    [
        lambda: optax_stab.guard_nonfinite(3),
        lambda: optax_stab.spike_guard("adam"),
        lambda: optax_stab.spike_guard(optax.adam),  # the factory, not built
        lambda: optax_stab.amplify_slow(1.0, filter=jnp.ones(3)),
    ],
    ids=["guard_int", "spike_guard_str", "spike_guard_factory", "amplify_filter"],
)
def test_wrapped_transform_must_be_a_transformation(make):
    with pytest.raises(TypeError, match=r"must be an optax.GradientTransformation"):
        make()
