"""Gradient-health monitoring: ``health_monitor`` (the report is in _health_report)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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
    *, decay: jax.typing.ArrayLike = 0.99, axis_name: Any = None
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
        axis_name: A ``pmap`` or ``shard_map`` axis over which the updates are
            split (FSDP or model-parallel shards, each device holding a slice
            of every split leaf). Each leaf's squared norm is summed across
            it, so every statistic (leaf norms, global norm, their minimum and
            maximum, ``nonfinite_leaves``) is that of the full updates and the
            state is identical on every device. Updates replicated on every
            device (data parallelism after a ``pmean``) would count once per
            device: pass no ``axis_name`` there. The monitor reads no
            ``loss=``. ``None`` (default) records the local shard. Not needed
            under plain ``jit`` with sharded arrays (GSPMD), where norms are
            already global.

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
        _validate.check_tree("health_monitor", params)

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
        _validate.check_tree(
            "health_monitor", updates, state.leaf_norms, shapes=False, params=params
        )
        del params, extra_args
        beta = _numerics.as_stat(decay)
        # One vector of norms (compiles faster than separate scalars when
        # they are only stored and reduced, _tree.leaf_norm_vector).
        norms = _tree.leaf_norm_vector(updates, axis_name=axis_name)
        norms = norms.astype(jnp.float32)
        leaves, treedef = jax.tree.flatten(updates)
        leaf_norms = jax.tree.unflatten(treedef, list(jnp.unstack(norms)))
        stacked = norms if leaves else jnp.zeros([1], jnp.float32)
        smallest, largest = _tree.extrema(stacked)
        grad_norm = _tree.combine_norms(stacked).astype(jnp.float32)
        finite = jnp.isfinite(grad_norm)
        # A leaf is non-finite when its norm is: no second pass over the data.
        bad_leaves = jnp.sum(~jnp.isfinite(norms), dtype=jnp.int32)

        # Fold the previous step's norm (if finite) into the statistics: the
        # current norm is then scored against the steps before it.
        prev = state.grad_norm
        fold = (state.health_step > 0) & jnp.isfinite(prev)
        k = jnp.maximum(state.health_step - 1, 0).astype(jnp.float32)
        b = jnp.minimum(beta, k / (k + 1))
        value = jnp.where(fold, prev, state.norm_ema)  # no fold: delta = 0
        ema, var = _numerics.ema_mean_var(state.norm_ema, state.norm_var_ema, value, b)
        var = jnp.minimum(var, jnp.finfo(jnp.float32).max)  # finite huge norms

        new_state = HealthState(
            grad_norm=grad_norm,
            leaf_norms=leaf_norms,
            norm_ema=jnp.where(fold, ema, state.norm_ema).astype(jnp.float32),
            norm_var_ema=jnp.where(fold, var, state.norm_var_ema).astype(jnp.float32),
            max_norm_seen=jnp.where(
                finite, jnp.maximum(state.max_norm_seen, grad_norm), state.max_norm_seen
            ),
            min_leaf_norm=smallest,
            max_leaf_norm=largest,
            nonfinite_leaves=jnp.asarray(bad_leaves, jnp.int32),
            health_step=_numerics.increment_if(finite, state.health_step),
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
