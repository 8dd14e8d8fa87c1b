"""Hyperparameter checks: messages name argument, range and value; tracers pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
