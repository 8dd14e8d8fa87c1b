"""Checks of hyperparameters (at construction) and of gradient trees (at trace time).

Hyperparameters fail at construction with a ValueError naming the argument, the
allowed range and the value; a range printed ``[0.0, inf)`` rejects ``inf``,
one printed ``[0.0, inf]`` accepts it (where ``inf`` means "off" and every
result stays finite).

**Leaf dtypes: one rule for the library.** Every transform's ``init`` (and
the ``update`` of the stateless ones) accepts floating-point leaves of any
width (bfloat16, float16, float32, float64) and raises a TypeError naming the
first leaf path whose dtype is integer, bool or anything else not inexact
(:func:`check_tree`). ``jax.grad`` never produces integer gradients, so an
integer leaf in an update tree is a mistake or a frozen leaf; pass frozen
leaves through ``optax.masked`` (masked leaves never reach the inner
transform). Complex leaves are accepted by the linear filters, the norm
clippers, the guards and the monitor, which keep them complex; transforms
that need an ordering of values (a median, ``sign``, comparisons) raise a
TypeError for them.

**Tree structure.** A transform that keeps per-leaf state or reads
``params`` raises a ValueError naming the first differing path when the
gradient tree differs from the one its state was built for or from the params
(a renamed key, another shape), instead of broadcasting. Transforms with only
tree-wide state (global norm clippers, stateless maps) accept any tree, and a
guard leaves the question to its inner transform. The check runs at trace
time only: it costs nothing per step under ``jit``.
"""

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


def _path(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path) if path else "<root>"


def _leaf_dtype(x: Any) -> np.dtype:
    dtype = getattr(x, "dtype", None)
    return jnp.dtype(jnp.result_type(x) if dtype is None else dtype)


def _check_match(
    name: str, tree: Any, reference: Any, lead_axes: int, shapes: bool, whose: str
) -> None:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    refs, ref_def = jax.tree_util.tree_flatten_with_path(reference)
    if treedef != ref_def:
        paths = [p for p, _ in leaves]
        ref_paths = [p for p, _ in refs]
        known, ref_known = set(paths), set(ref_paths)
        extra = [p for p in paths if p not in ref_known]
        missing = [p for p in ref_paths if p not in known]
        parts = []
        if extra:
            parts.append(f"the updates have {_path(extra[0])}, which it lacks")
        if missing:
            parts.append(f"the updates lack its {_path(missing[0])}")
        if not parts:  # same leaf paths: other node types, or None leaves
            parts.append(f"the updates' tree is {treedef}, it is {ref_def}")
        raise ValueError(
            f"{name}: the updates' tree differs from {whose} tree: {'; '.join(parts)}."
        )
    if shapes:
        for (path, x), (_, r) in zip(leaves, refs):
            want = tuple(np.shape(r))[lead_axes:]
            if tuple(np.shape(x)) != want:
                raise ValueError(
                    f"{name}: leaf {_path(path)} has shape {tuple(np.shape(x))}, "
                    f"{whose} tree has shape {want} there."
                )


def check_tree(
    name: str,
    tree: Any,
    reference: Any = None,
    *,
    params: Any = None,
    ordered: bool = False,
    lead_axes: int = 0,
    shapes: bool = True,
    store_dtype: Any = None,
) -> None:
    """Checks a params or gradient tree at trace time (no runtime cost).

    Args:
        name: The transform's name, used in the messages.
        tree: Params (from ``init``) or updates (from ``update``).
        reference: If given, a tree the state holds per leaf (an EMA, a ring
            buffer's values, per-leaf norms): ``tree`` must have its structure,
            and (if ``shapes``) each leaf the reference leaf's shape with its
            first ``lead_axes`` axes dropped.
        params: If given, the params ``update`` received: ``tree`` must have
            their structure and shapes.
        ordered: Whether the transform needs an ordering of values, so complex
            leaves are rejected.
        lead_axes: Leading axes of each reference leaf that ``tree`` lacks
            (1 for a ring buffer's window axis).
        shapes: Whether to compare shapes with ``reference`` (False for
            per-leaf scalars).
        store_dtype: A user-chosen dtype the state stores leaves in; if it is
            real, complex leaves are rejected, as it would drop their
            imaginary part.

    Raises:
        ValueError: If ``tree`` differs from ``reference`` or ``params`` in
            structure or shape; the message names the first differing path.
        TypeError: If a leaf is not floating point (integer, bool, float0), or
            is complex where ``ordered`` or a real ``store_dtype`` is given;
            the message names the leaf path and dtype.
    """
    if reference is not None:
        _check_match(name, tree, reference, lead_axes, shapes, "the state's")
    if params is not None:
        _check_match(name, tree, params, 0, True, "the params'")
    store_complex = store_dtype is None or jnp.issubdtype(
        jnp.dtype(store_dtype), jnp.complexfloating
    )
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = _leaf_dtype(x)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{name}: leaf {_path(path)} has dtype {dtype}; optax_stab "
                "transforms take floating-point leaves only (exclude frozen or "
                "integer leaves with optax.masked)."
            )
        if jnp.issubdtype(dtype, jnp.complexfloating):
            if ordered:
                raise TypeError(
                    f"{name}: leaf {_path(path)} has dtype {dtype}; it needs an "
                    "ordering, complex is not supported."
                )
            if not store_complex:
                raise TypeError(
                    f"{name}: leaf {_path(path)} has dtype {dtype}, which the "
                    f"real dtype {jnp.dtype(store_dtype)} it is stored in cannot "
                    "hold."
                )


def check_transform(name: str, value: Any) -> None:
    """Checks that a wrapped ``inner`` argument is an optax transformation.

    Raises:
        TypeError: If ``value`` lacks callable ``init`` and ``update``.
    """
    if not (
        callable(getattr(value, "init", None))
        and callable(getattr(value, "update", None))
    ):
        raise TypeError(
            f"`{name}` must be an optax.GradientTransformation, got {value!r}."
        )


def check_interval(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_closed: bool = False,
    high_closed: bool = False,
    allow_inf: bool = False,
) -> None:
    """Checks that a numeric scalar lies in an interval; NaN always fails.

    An unbounded side rejects infinity (printed ``inf)``) unless
    ``allow_inf`` (printed ``inf]``): accept ``inf`` only where it means "off"
    and every result stays finite.

    Args:
        name: Argument name used in the error message.
        value: A Python number or a concrete scalar array; traced values are
            skipped.
        low: Lower bound, or ``None`` for no bound.
        high: Upper bound, or ``None`` for no bound.
        low_closed: Whether ``low`` itself is allowed.
        high_closed: Whether ``high`` itself is allowed.
        allow_inf: Whether ``inf`` is allowed when ``high`` is ``None``.

    Raises:
        ValueError: If the value is not a real scalar, is NaN, or lies outside.
    """
    if is_traced(value):
        return
    if high is None:
        high, high_closed = math.inf, allow_inf
    if low is None:
        low, low_closed = -math.inf, False
    lo_s = _fmt(low)
    hi_s = _fmt(high)
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
