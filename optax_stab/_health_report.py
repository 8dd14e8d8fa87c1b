"""``health_report``: the host-side walk that turns an optimizer state into floats.

It finds every ``HealthState``, every clip and guard
state with diagnostic counters (ours, and ``optax.apply_if_finite``'s) and every
``optax.inject_hyperparams`` state in a nested optimizer state, and flattens
them to ``{"path/key": float}`` for a logger. Nothing here runs under jit.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_stab import _numerics, _validate
from optax_stab._health import HealthState

_MIN_HISTORY = 8
"""Finite norms the statistics must hold before ``exploding`` uses the z-score."""

_HEALTH_FIELDS = frozenset(HealthState._fields)
_DIAGNOSTIC_FIELDS = frozenset(
    {
        "pre_clip_norm",
        "clipped_steps",
        "grad_norm",
        "spike_steps",
        "nonfinite_steps",
        "consecutive_nonfinite",
        "total_notfinite",  # optax.apply_if_finite
    }
)
_WRAPPER_FIELDS = frozenset({"inner_state", "inner_states", "inner_opt_state"})


def _is_state(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _unwrap_variables(tree: Any) -> Any:
    """Replaces Flax NNX ``Variable`` wrappers (``OptState``) by their values."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return tree
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return jax.tree.map(
        lambda v: v.get_value() if is_var(v) else v, tree, is_leaf=is_var
    )


def _children(node: Any) -> list[tuple[str, Any]]:
    """One level of a pytree: ``(key, child)`` pairs; [] for a leaf."""
    if node is None or isinstance(node, (jax.Array, np.ndarray, np.generic)):
        return []
    kids, _ = jax.tree_util.tree_flatten_with_path(
        node, is_leaf=lambda x: x is not node
    )
    if len(kids) == 1 and kids[0][0] == ():
        return []
    return [(jax.tree_util.keystr(p, simple=True, separator="/"), c) for p, c in kids]


def _kind(node: Any) -> str | None:
    if not _is_state(node):
        return None
    fields = set(node._fields)
    if _HEALTH_FIELDS <= fields:
        return "health"
    if fields & _DIAGNOSTIC_FIELDS:
        return "diagnostic"
    if {"hyperparams", "inner_state"} <= fields:
        return "hyperparams"
    return None


def _walk(node: Any, path: tuple[str, ...], found: list) -> None:
    kind = _kind(node)
    if kind is not None:
        found.append((path, kind, node))
    keep_wrapper_labels = kind in ("health", "diagnostic")
    for key, child in _children(node):
        dropped = _is_state(node) and key in _WRAPPER_FIELDS
        _walk(
            child, path if dropped and not keep_wrapper_labels else (*path, key), found
        )


def _is_scalar(x: Any) -> bool:
    """A numeric or boolean scalar (checked without a host transfer)."""
    if isinstance(x, (bool, int, float)):
        return True
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        kind_ok = jnp.issubdtype(x.dtype, jnp.number) or x.dtype == jnp.bool_
        return x.ndim == 0 and bool(kind_ok)
    return False


def _scalar_tree(value: Any, key: str) -> dict[str, Any] | None:
    """``{key/leafpath: leaf}`` if ``value`` is a scalar or a tree of scalars."""
    if _is_scalar(value):
        return {key: value}
    if _is_state(value):
        return None
    leaves = jax.tree_util.tree_flatten_with_path(value)[0]
    if not leaves or not all(_is_scalar(x) for _, x in leaves):
        return None
    out = {}
    for p, x in leaves:
        sub = jax.tree_util.keystr(p, simple=True, separator="/")
        out[f"{key}/{sub}" if sub else key] = x
    return out


def _health_keys(s: HealthState, ratio: float, z_max: float) -> dict[str, float]:
    g = float(s.grad_norm)
    finite = math.isfinite(g)
    folded = int(s.health_step) - int(finite)
    z = float(
        _numerics.zscore(
            jnp.float32(g), jnp.float32(s.norm_ema), jnp.sqrt(s.norm_var_ema)
        )
    )
    z = z if folded >= _MIN_HISTORY or not finite else 0.0
    leaves = [
        (jax.tree_util.keystr(p, simple=True, separator="/"), float(x))
        for p, x in jax.tree_util.tree_flatten_with_path(s.leaf_norms)[0]
    ]
    finite_norms = [n for _, n in leaves if math.isfinite(n)]
    largest = max(finite_norms, default=0.0)
    vanishing = [p for p, n in leaves if n < ratio * largest]
    out = {
        "grad_norm": g,
        "grad_norm_z": z,
        "exploding": float(not finite or z > z_max),
        "norm_ema": float(s.norm_ema),
        "norm_var_ema": float(s.norm_var_ema),
        "max_norm_seen": float(s.max_norm_seen),
        "min_leaf_norm": float(s.min_leaf_norm),
        "max_leaf_norm": float(s.max_leaf_norm),
        "nonfinite_leaves": float(s.nonfinite_leaves),
        "health_step": float(s.health_step),
        "vanishing_leaves": float(len(vanishing)),
    }
    out.update({f"leaf_norm/{p}" if p else "leaf_norm": n for p, n in leaves})
    out.update({f"vanishing/{p}" if p else "vanishing": 1.0 for p in vanishing})
    return out


def _payload(kind: str, node: Any) -> Any:
    """The part of a found state that the report reads (scalars only)."""
    if kind == "health":
        return node
    if kind == "hyperparams":
        fields = {f"hyperparams/{k}": v for k, v in node.hyperparams.items()}
    else:
        fields = {f: getattr(node, f) for f in node._fields}
    out = []  # a list, not a dict: device_get would sort a dict's keys
    for name, value in fields.items():
        if name not in _WRAPPER_FIELDS:
            out.extend((_scalar_tree(value, name) or {}).items())
    return out


def _unit_keys(
    kind: str, payload: Any, ratio: float, z_max: float, stalled: float
) -> dict:
    if kind == "health":
        return _health_keys(payload, ratio, z_max)
    out = {k: float(v) for k, v in payload}
    if "skip_fraction" in out:  # a guard of optax_stab
        out["guard_stalled"] = float(out["skip_fraction"] > stalled)
    return out


def health_report(
    opt_state: Any,
    *,
    vanishing_ratio: float = 1e-3,
    exploding_z: float = 6.0,
    stalled_fraction: float = 0.5,
) -> dict[str, float]:
    """Flattens every health, clip and guard state in an optimizer state to floats.

    The optimizer state is searched recursively: chains (tuples),
    ``optax.named_chain`` and ``optax.multi_transform`` (dicts of states),
    ``optax.masked``, ``optax.MultiSteps``, ``optax.inject_hyperparams`` (its
    numeric hyperparameters are reported as ``hyperparams/<name>``), the
    guards of :mod:`optax_stab`, and Flax: pass ``nnx.Optimizer.opt_state``
    (its ``OptState`` variables are unwrapped), the ``nnx.Optimizer`` itself,
    or a linen ``TrainState`` (anything with an ``opt_state`` attribute).
    States are recognised by their field names, not their classes:

    * a :class:`HealthState` gives ``grad_norm``, ``grad_norm_z`` (the z-score
      of the current norm against ``norm_ema`` and ``sqrt(norm_var_ema)``, 0
      until 8 finite norms are in the statistics), ``exploding`` (1.0 when
      ``grad_norm`` is not finite or ``grad_norm_z > exploding_z``), its
      other fields, ``leaf_norm/<path>`` for every leaf (``path`` is the
      leaf's pytree path, e.g. ``leaf_norm/Dense_0/kernel``),
      ``vanishing_leaves`` (the number of leaves whose norm is below
      ``vanishing_ratio`` times the largest finite leaf norm) and
      ``vanishing/<path>`` = 1.0 for each of them (only those keys appear);
    * any other state with a field such as ``pre_clip_norm``,
      ``clipped_steps``, ``spike_steps``, ``nonfinite_steps`` or
      ``consecutive_nonfinite`` gives every scalar field under its own name
      (``pre_clip_norm``, ``spike_steps``, ``norm_z``, ...) and every field
      that is a pytree of scalars as ``<field>/<path>``;
    * a guard of :mod:`optax_stab` (a state with a ``skip_fraction`` field:
      :func:`guard_nonfinite`, :func:`spike_guard`) also gives
      ``guard_stalled``: 1.0 when ``skip_fraction``, the guard's EMA of
      skipped steps over about the last 100 steps (decay 0.99), is above
      ``stalled_fraction`` (by default: more than half of the recent steps
      were skipped, so training has all but stopped), else 0.0.

    Keys are the names above when they are unique. When two states would
    give the same key (two monitors, two clippers), every key of those
    states is prefixed with the state's path: ``"/"``-joined chain indices,
    dict labels and field names, where the wrapper fields ``inner_state``,
    ``inner_states`` and ``inner_opt_state`` are left out unless the wrapper
    is itself reported. For ``chain(health_monitor(), clip, health_monitor(),
    adam)`` the keys are ``0/grad_norm`` and ``2/grad_norm``.

    This function transfers the found scalars to the host: call it outside
    ``jit``, e.g. every N steps.

    Args:
        opt_state: An optimizer state, or an object with an ``opt_state``
            attribute.
        vanishing_ratio: Relative leaf norm below which a leaf is vanishing,
            in [0, 1].
        exploding_z: z-score above which the global norm is exploding; > 0.
        stalled_fraction: Fraction of recent steps skipped above which a guard
            is stalled, in [0, 1].

    Returns:
        A ``dict`` of plain Python floats, ready for any logger.

    Raises:
        ValueError: If ``vanishing_ratio``, ``exploding_z`` or
            ``stalled_fraction`` is out of range.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax
        >>> import optax_stab
        >>> tx = optax.chain(
        ...     optax_stab.health_monitor(),
        ...     optax_stab.guard_nonfinite(optax.sgd(0.1)),
        ... )
        >>> params = {"w": jnp.ones(3)}
        >>> state = tx.init(params)
        >>> _, state = tx.update({"w": jnp.array([3.0, 0.0, jnp.nan])}, state)
        >>> report = optax_stab.health_report(state)
        >>> print(report["exploding"], report["nonfinite_leaves"])
        1.0 1.0
        >>> print(report["nonfinite_steps"], report["consecutive_nonfinite"])
        1.0 1.0
    """
    _validate.check_interval(
        "vanishing_ratio",
        vanishing_ratio,
        low=0.0,
        high=1.0,
        low_closed=True,
        high_closed=True,
    )
    _validate.check_interval("exploding_z", exploding_z, low=0.0)
    _validate.check_interval(
        "stalled_fraction",
        stalled_fraction,
        low=0.0,
        high=1.0,
        low_closed=True,
        high_closed=True,
    )
    if not _is_state(opt_state) and hasattr(opt_state, "opt_state"):
        opt_state = opt_state.opt_state
    found: list = []
    _walk(_unwrap_variables(opt_state), (), found)
    # One transfer of the scalars only (never the moments of an inner state).
    payloads = jax.device_get([_payload(kind, node) for _, kind, node in found])
    units = [
        (
            path,
            _unit_keys(kind, payload, vanishing_ratio, exploding_z, stalled_fraction),
        )
        for (path, kind, _), payload in zip(found, payloads)
    ]
    seen: dict[str, int] = {}
    for _, keys in units:
        for k in keys:
            seen[k] = seen.get(k, 0) + 1
    report: dict[str, float] = {}
    for path, keys in units:
        clash = path and any(seen[k] > 1 for k in keys)
        prefix = "/".join(path) + "/" if clash else ""
        report.update({prefix + k: v for k, v in keys.items()})
    return report
