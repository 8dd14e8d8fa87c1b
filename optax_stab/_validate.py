"""Hyperparameter checks that fail at construction with a clear ValueError."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NO_PARAMS_MSG = (
    "This transformation needs `params`: call `update(updates, state, params)` "
    "(inside `optax.chain`, pass `params` to the chain's update)."
)


def is_traced(value: Any) -> bool:
    """True for values that only exist inside a trace (``inject_hyperparams``)."""
    return isinstance(value, jax.core.Tracer)


def _fmt(bound: float) -> str:
    return repr(float(bound))


def check_interval(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_closed: bool = False,
    high_closed: bool = False,
) -> None:
    """Checks that a numeric scalar lies in an interval; NaN always fails.

    Args:
        name: Argument name used in the error message.
        value: A Python number or a concrete scalar array; traced values are
            skipped.
        low: Lower bound, or ``None`` for no bound.
        high: Upper bound, or ``None`` for no bound.
        low_closed: Whether ``low`` itself is allowed.
        high_closed: Whether ``high`` itself is allowed.

    Raises:
        ValueError: If the value is not a real scalar, is NaN, or lies outside.
    """
    if is_traced(value):
        return
    lo_s = "-inf" if low is None else _fmt(low)
    hi_s = "inf" if high is None else _fmt(high)
    interval = (
        f"{'[' if low_closed else '('}{lo_s}, {hi_s}{']' if high_closed else ')'}"
    )
    try:
        arr = np.asarray(value)
        real = arr.dtype.kind in "biuf" or jnp.issubdtype(arr.dtype, jnp.floating)
        if arr.shape != () or not real:  # bfloat16 has numpy kind "V"
            raise TypeError
        x = float(arr)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be a real scalar in {interval}, got {value!r}."
        ) from None
    ok = not math.isnan(x)
    if ok and low is not None:
        ok = x >= low if low_closed else x > low
    if ok and high is not None:
        ok = x <= high if high_closed else x < high
    if not ok:
        raise ValueError(f"`{name}` must be in {interval}, got {value!r}.")


def check_int(name: str, value: Any, *, low: int = 1, high: int | None = None) -> None:
    """Checks a static (structural) integer such as a window length.

    Raises:
        ValueError: If ``value`` is not a Python ``int`` (bool excluded) in
            ``[low, high]``. Traced values are rejected too: structural
            arguments must be static (``inject_hyperparams(..., static_args=...)``).
    """
    hi_s = "inf" if high is None else str(high)
    interval = f"[{low}, {hi_s}{']' if high is not None else ')'}"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"`{name}` must be a static Python int in {interval}, got {value!r}"
            " (with optax.inject_hyperparams, list it in `static_args`)."
        )
    if value < low or (high is not None and value > high):
        raise ValueError(f"`{name}` must be an int in {interval}, got {value!r}.")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Checks that a static option is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def check_weights(name: str, weights: Any) -> np.ndarray:
    """Checks causal filter weights and returns them as a float64 NumPy vector.

    The weights must be a non-empty 1-D vector of finite reals, and every
    prefix sum must be non-zero, because windowed filters renormalise the
    weights over the lags available during warm-up.

    Raises:
        ValueError: If any of the above does not hold.
    """
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be a 1-D vector of finite reals, got {weights!r}."
        ) from None
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)):
        raise ValueError(
            f"`{name}` must be a non-empty 1-D vector of finite reals, got {weights!r}."
        )
    prefix = np.cumsum(w)
    scale = np.max(np.abs(w))
    if np.any(np.abs(prefix) <= 1e-6 * scale):
        raise ValueError(
            f"`{name}` must have non-zero prefix sums (the filter is renormalised "
            f"over the available lags during warm-up), got {weights!r} with "
            f"prefix sums {prefix.tolist()}."
        )
    return w


def require_params(params: Any) -> None:
    """Raises the standard ValueError when a transform needs ``params``."""
    if params is None:
        raise ValueError(NO_PARAMS_MSG)


def check_count(name: str, value: Any, *, low: int = 0) -> None:
    """Checks a numeric integer hyperparameter (a step count such as a warm-up).

    Unlike :func:`check_int`, the value may be traced or an integer array, so
    ``optax.inject_hyperparams`` can sweep it; traced values are skipped.

    Raises:
        ValueError: If ``value`` is not an integer scalar (bool excluded) >= ``low``.
    """
    if is_traced(value):
        return
    arr = np.asarray(value)
    if isinstance(value, bool) or arr.shape != () or arr.dtype.kind not in "iu":
        raise ValueError(f"`{name}` must be an integer in [{low}, inf), got {value!r}.")
    if int(arr) < low:
        raise ValueError(f"`{name}` must be in [{low}, inf), got {value!r}.")
