"""Pytree norms accumulated in float32, zero-safe, optionally summed over an axis."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optax_stab import _numerics


def safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt`` whose value and derivative are 0 at 0 (NaN and Inf propagate)."""
    zero = x == 0
    return jnp.where(zero, jnp.zeros_like(x), jnp.sqrt(jnp.where(zero, 1, x)))


def squared_norm(x: jax.Array, dtype: Any = None) -> jax.Array:
    """Sum of squares of one array, accumulated in ``dtype`` (default float32)."""
    dtype = _numerics.resolve_dtype(dtype)
    return jnp.sum(jnp.square(jnp.asarray(x).astype(dtype)), dtype=dtype)


def _psum(x: jax.Array, axis_name: Any) -> jax.Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def leaf_squared_norms(tree: Any, *, axis_name: Any = None, dtype: Any = None) -> Any:
    """Per-leaf sums of squares (a pytree of scalars), summed over ``axis_name``."""
    return jax.tree.map(lambda x: _psum(squared_norm(x, dtype), axis_name), tree)


def leaf_norms(tree: Any, *, axis_name: Any = None, dtype: Any = None) -> Any:
    """Per-leaf L2 norms (a pytree of scalars) in float32, zero-safe.

    Args:
        tree: A pytree of arrays of any float dtype.
        axis_name: If given, squared norms are summed across this pmap or
            shard_map axis before the square root, so a leaf split over
            devices gets its full norm.
        dtype: Accumulation dtype; ``None`` means float32.
    """
    return jax.tree.map(
        safe_sqrt, leaf_squared_norms(tree, axis_name=axis_name, dtype=dtype)
    )


def global_norm(tree: Any, *, axis_name: Any = None, dtype: Any = None) -> jax.Array:
    """Global L2 norm of a pytree, accumulated in float32 whatever the leaf dtype.

    Unlike ``optax.tree.norm`` on bfloat16 leaves, the sum of squares never
    rounds to bfloat16: 1000 leaves of ``ones(1000, bfloat16)`` give 1000.
    The value and its derivative are 0 (not NaN) at an all-zero tree; NaN and
    Inf propagate.
    """
    dtype = _numerics.resolve_dtype(dtype)
    leaves = jax.tree.leaves(tree)
    total = sum((squared_norm(x, dtype) for x in leaves), jnp.zeros([], dtype))
    return safe_sqrt(_psum(total, axis_name))


def all_finite(tree: Any) -> jax.Array:
    """Boolean scalar: every element of every leaf is finite."""
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves] or [True]))


def scale(tree: Any, factor: jax.Array) -> Any:
    """Multiplies every leaf by a scalar, keeping each leaf's dtype."""
    return jax.tree.map(lambda x: x * factor.astype(x.dtype), tree)


def select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Leaf-wise ``jnp.where(pred, a, b)`` of two pytrees of equal structure."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def cast_like(tree: Any, reference: Any) -> Any:
    """Casts each leaf of ``tree`` to the dtype of the matching ``reference`` leaf."""
    return jax.tree.map(lambda x, r: jnp.asarray(x).astype(r.dtype), tree, reference)


def combine_norms(norms: Any) -> jax.Array:
    """Global norm from a pytree of per-leaf norms, without overflow.

    ``sqrt(sum(n_i**2))`` computed as ``m * sqrt(sum((n_i / m)**2))`` with
    ``m = max n_i``; 0 (with derivative 0) for all-zero norms, Inf or NaN if
    any norm is.
    """
    leaves = jax.tree.leaves(norms)
    if not leaves:
        return jnp.zeros([], jnp.float32)
    n = jnp.stack([jnp.asarray(x) for x in leaves])
    m = jnp.max(n)
    ok = jnp.isfinite(m) & (m > 0)
    d = jnp.where(ok, m, jnp.ones_like(m))
    return jnp.where(ok, d * safe_sqrt(jnp.sum(jnp.square(n / d))), m)


def scale_where(tree: Any, pred: jax.Array, factor: jax.Array) -> Any:
    """Leaf-wise ``x * factor`` where ``pred`` holds, else ``x`` bit for bit.

    The product is computed in float32 (or the leaf's wider dtype) and cast
    back, so a bfloat16 leaf is rounded once. ``factor`` is only read where
    ``pred`` holds, so an Inf or NaN factor elsewhere leaks into neither the
    value nor its derivative.
    """

    def one(x):
        ct = _numerics.compute_dtype(x.dtype)
        f = jnp.where(pred, factor, jnp.ones_like(factor)).astype(ct)
        return jnp.where(pred, (x.astype(ct) * f).astype(x.dtype), x)

    return jax.tree.map(one, tree)


def clip_to_norm(
    tree: Any, norm: jax.Array, max_norm: jax.Array
) -> tuple[Any, jax.Array]:
    """Scales ``tree`` (of norm ``norm``) down to ``max_norm`` when above it.

    Returns ``(tree, clipped)``. Where ``norm <= max_norm`` or ``norm`` is not
    finite, the leaves come back bit for bit; ``max_norm = 0`` with
    ``norm = 0`` is not a clip (no 0/0). ``max_norm`` may be ``inf``.
    """
    clipped = jnp.isfinite(norm) & (norm > max_norm)
    factor = max_norm / jnp.where(clipped, norm, jnp.ones_like(norm))
    return scale_where(tree, clipped, factor), clipped


def map_unzip(fn: Any, tree: Any, *rest: Any, n: int) -> tuple[Any, ...]:
    """``jax.tree.map`` of ``fn`` returning an ``n``-tuple, as ``n`` pytrees.

    Each result has the structure of ``tree``; an empty tree gives ``n``
    empty trees.
    """
    outer = jax.tree.structure(tree)
    if outer.num_leaves == 0:
        return tuple(jax.tree.unflatten(outer, []) for _ in range(n))
    inner = jax.tree.structure((0,) * n)
    return jax.tree.transpose(outer, inner, jax.tree.map(fn, tree, *rest))


def any_leaf(flags: Any) -> jax.Array:
    """Boolean scalar: any leaf of a pytree of booleans is True (False if empty)."""
    leaves = jax.tree.leaves(flags)
    if not leaves:
        return jnp.zeros([], bool)
    return jnp.any(jnp.stack([jnp.any(x) for x in leaves]))
