"""Hyperparameter checks: messages name argument, range and value; tracers pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

from optax_stab import _validate


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (
            1.5,
            {"low": 0.0, "high": 1.0, "low_closed": True},
            r"`x` must be in \[0.0, 1.0\), got 1.5.",
        ),
        (float("nan"), {"low": 0.0}, r"`x` must be in \(0.0, inf\), got nan."),
        (0.0, {"low": 0.0}, r"`x` must be in \(0.0, inf\), got 0.0."),
        ("a", {"low": 0.0}, r"`x` must be a real scalar"),
        (jnp.ones(2), {"low": 0.0}, r"`x` must be a real scalar"),
    ],
)
def test_check_interval_rejects(value, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _validate.check_interval("x", value, **kwargs)


def test_check_interval_accepts_bounds_arrays_and_skips_tracers():
    _validate.check_interval("x", 0.0, low=0.0, low_closed=True)
    _validate.check_interval("x", jnp.asarray(0.5), low=0.0, high=1.0)
    # inject_hyperparams casts hyperparameters to the params' dtype (bf16 too).
    _validate.check_interval("x", jnp.asarray(0.5, jnp.bfloat16), low=0.0, high=1.0)
    with pytest.raises(ValueError, match="got"):
        _validate.check_interval("x", jnp.asarray(1.5, jnp.bfloat16), high=1.0)
    jax.jit(lambda v: _validate.check_interval("x", v, low=0.0) or v)(-1.0)


@pytest.mark.parametrize("value", [0, -1, 2.0, True, None, 40])
def test_check_int_rejects(value):
    with pytest.raises(ValueError, match=r"`window`.*got"):
        _validate.check_int("window", value, low=1, high=32)


def test_check_choice_and_params():
    with pytest.raises(
        ValueError, match=r"`mode` must be one of \('a', 'b'\), got 'c'"
    ):
        _validate.check_choice("mode", "c", ("a", "b"))
    with pytest.raises(ValueError, match="needs `params`"):
        _validate.require_params(None)


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (float("inf"), {"low": 0.0}, r"`x` must be in \(0.0, inf\), got inf."),
        (float("-inf"), {}, r"`x` must be in \(-inf, inf\), got -inf."),
        (-1.0, {"low": 0.0, "allow_inf": True}, r"in \(0.0, inf\], got -1.0."),
    ],
)
def test_check_interval_prints_the_range_it_accepts(value, kwargs, message):
    # "inf)" means infinity is rejected, "inf]" that it is accepted.
    with pytest.raises(ValueError, match=message):
        _validate.check_interval("x", value, **kwargs)
    _validate.check_interval("x", float("inf"), low=0.0, allow_inf=True)


def test_check_tree_names_the_first_bad_leaf():
    tree = {"a": jnp.ones(2), "b": {"c": jnp.ones(2, jnp.int32)}}
    with pytest.raises(TypeError, match=r"tx: leaf \['b'\]\['c'\] has dtype int32"):
        _validate.check_tree("tx", tree)
    with pytest.raises(TypeError, match=r"<root> has dtype bool"):
        _validate.check_tree("tx", jnp.ones(2, bool))
    z = {"w": jnp.ones(2, jnp.complex64)}
    _validate.check_tree("tx", z)  # complex is fine unless an ordering is needed
    with pytest.raises(TypeError, match=r"\['w'\] has dtype complex64; it needs an"):
        _validate.check_tree("tx", z, ordered=True)
    with pytest.raises(TypeError, match=r"real dtype bfloat16"):
        _validate.check_tree("tx", z, store_dtype=jnp.bfloat16)
    _validate.check_tree("tx", {"a": None, "b": jnp.ones(2, jnp.bfloat16)})


def test_check_tree_compares_structure_and_shapes():
    ref = {"w": jnp.zeros((4, 2, 2)), "b": jnp.zeros((4, 2))}
    ok = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    _validate.check_tree("tx", ok, ref, lead_axes=1)
    with pytest.raises(ValueError, match=r"have \['v'\], which it lacks.*lack its"):
        _validate.check_tree("tx", {"v": ok["w"], "b": ok["b"]}, ref, lead_axes=1)
    with pytest.raises(ValueError, match=r"\['w'\] has shape \(1, 2\), the state's"):
        _validate.check_tree("tx", {**ok, "w": jnp.ones((1, 2))}, ref, lead_axes=1)
    with pytest.raises(ValueError, match=r"\['b'\] has shape \(3,\), the params'"):
        _validate.check_tree("tx", {**ok, "b": jnp.ones(3)}, params=ok)
    with pytest.raises(ValueError, match=r"differs from the state's tree"):
        _validate.check_tree("tx", {"w": ok["w"], "b": None}, ref, lead_axes=1)
    # Traced leaves are checked by their abstract shapes: no runtime cost.
    jax.jit(lambda t: _validate.check_tree("tx", t, ref, lead_axes=1) or t)(ok)


def test_check_transform():
    _validate.check_transform("inner", optax.sgd(0.1))
    with pytest.raises(TypeError, match=r"`inner` must be an optax"):
        _validate.check_transform("inner", lambda g: g)
