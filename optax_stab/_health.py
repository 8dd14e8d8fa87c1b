"""Gradient-health monitoring: ``health_monitor`` and ``health_report``."""

from __future__ import annotations

import math
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_stab import _numerics, _tree, _validate


class HealthState(NamedTuple):
    """State of :func:`health_monitor`.

    Attributes:
        grad_norm: Global L2 norm of this step's updates; float32 scalar (NaN
            or Inf on a non-finite step).
        leaf_norms: L2 norm of each leaf this step; a pytree of float32
            scalars like the params.
        norm_ema: EMA of the finite global norms of the *previous* steps (the
            current norm is compared against it); float32 scalar.
        norm_var_ema: EMA variance of the same norms; float32 scalar.
        max_norm_seen: Largest finite global norm seen; float32 scalar.
        min_leaf_norm: Smallest leaf norm this step; float32 scalar.
        max_leaf_norm: Largest leaf norm this step; float32 scalar.
        nonfinite_leaves: Leaves whose norm is not finite this step (a NaN or
            Inf, or a norm beyond float32's max); int32 scalar.
        health_step: Steps with a finite global norm seen so far; int32
            scalar, saturating.
    """

    grad_norm: jax.Array
    leaf_norms: Any
    norm_ema: jax.Array
    norm_var_ema: jax.Array
    max_norm_seen: jax.Array
    min_leaf_norm: jax.Array
    max_leaf_norm: jax.Array
    nonfinite_leaves: jax.Array
    health_step: jax.Array


def health_monitor(
    *, decay: jax.typing.ArrayLike = 0.99
) -> optax.GradientTransformationExtraArgs:
    r"""Identity transform that records the health of what passes through it.

    Put it first in a chain to watch the gradients, or last to watch the
    updates. Each step it records, in float32, the global norm :math:`n_t`,
    every leaf's norm, their minimum and maximum, the number of leaves
    holding NaN or Inf, and the largest finite global norm seen. It also
    keeps an EMA mean and variance of the finite norms of the *previous*
    steps, so that :func:`health_report` can score the current norm against
    them. The first :math:`1/(1-\beta)` norms are averaged exactly (effective
    decay :math:`\min(\beta, k/(k+1))` for the :math:`k`-th value), so the
    statistics are unbiased from the start:

    .. math::
        \delta = n - \mu, \quad \mu \leftarrow \mu + (1 - \beta_k)\,\delta,
        \quad \sigma^2 \leftarrow \beta_k (\sigma^2 + (1 - \beta_k)\,\delta^2).

    A non-finite norm is recorded in ``grad_norm`` (and the leaves in
    ``nonfinite_leaves``) but never enters the EMAs or ``max_norm_seen``.
    The updates pass through unchanged, in their own dtype.

    Args:
        decay: EMA decay :math:`\beta` of the norm statistics, in [0, 1).

    Returns:
        An :class:`optax.GradientTransformationExtraArgs` whose state is a
        :class:`HealthState`.

    Raises:
        ValueError: If ``decay`` is outside [0, 1).

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax_stab
        >>> tx = optax_stab.health_monitor()
        >>> state = tx.init({"w": jnp.zeros(2), "b": jnp.zeros(1)})
        >>> for g in (1.0, 2.0, 6.0):
        ...     u, state = tx.update({"w": jnp.full(2, g), "b": jnp.zeros(1)}, state)
        >>> report = optax_stab.health_report(state)
        >>> print(report["leaf_norm/w"], report["norm_ema"], report["vanishing/b"])
        8.485280990600586 2.1213202476501465 1.0

    .. seealso:: :func:`health_report`.
    """
    _validate.check_interval("decay", decay, low=0.0, high=1.0, low_closed=True)

    def init_fn(params):
        def zero():  # a fresh buffer per field, so the state can be donated
            return jnp.zeros([], jnp.float32)

        return HealthState(
            grad_norm=zero(),
            leaf_norms=jax.tree.map(lambda _: zero(), params),
            norm_ema=zero(),
            norm_var_ema=zero(),
            max_norm_seen=zero(),
            min_leaf_norm=zero(),
            max_leaf_norm=zero(),
            nonfinite_leaves=_numerics.zero_count(),
            health_step=_numerics.zero_count(),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        beta = _numerics.as_stat(decay)
        leaf_norms = _tree.leaf_norms(updates)
        norms = [jnp.asarray(n, jnp.float32) for n in jax.tree.leaves(leaf_norms)]
        stacked = jnp.stack(norms) if norms else jnp.zeros([1], jnp.float32)
        grad_norm = _tree.combine_norms(leaf_norms).astype(jnp.float32)
        finite = jnp.isfinite(grad_norm)
        # A leaf is non-finite when its norm is: no second pass over the data.
        bad_leaves = sum((~jnp.isfinite(n)).astype(jnp.int32) for n in norms)

        # Fold the previous step's norm (if finite) into the statistics: the
        # current norm is then scored against the steps before it.
        prev = state.grad_norm
        fold = (state.health_step > 0) & jnp.isfinite(prev)
        k = jnp.maximum(state.health_step - 1, 0).astype(jnp.float32)
        b = jnp.minimum(beta, k / (k + 1))
        delta = jnp.where(fold, prev - state.norm_ema, 0)
        ema = state.norm_ema + (1 - b) * delta
        var = b * (state.norm_var_ema + (1 - b) * jnp.square(delta))
        var = jnp.minimum(var, jnp.finfo(jnp.float32).max)  # finite huge norms

        new_state = HealthState(
            grad_norm=grad_norm,
            leaf_norms=leaf_norms,
            norm_ema=jnp.where(fold, ema, state.norm_ema).astype(jnp.float32),
            norm_var_ema=jnp.where(fold, var, state.norm_var_ema).astype(jnp.float32),
            max_norm_seen=jnp.where(
                finite, jnp.maximum(state.max_norm_seen, grad_norm), state.max_norm_seen
            ),
            min_leaf_norm=jnp.min(stacked),
            max_leaf_norm=jnp.max(stacked),
            nonfinite_leaves=jnp.asarray(bad_leaves, jnp.int32),
            health_step=_numerics.increment_if(finite, state.health_step),
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# -------------------------------------------------------------------- report
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
