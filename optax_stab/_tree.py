"""Pytree norms accumulated in float32, zero-safe, optionally summed over an axis.

**Tree-wide scalars and compile time.** A scalar computed from every leaf (a
global norm, an "all finite" flag) and then read by every leaf's elementwise
update is, in XLA's optimised HLO, a chain of ``N`` cheap scalar ops (``add``,
``and``, ``max``, compares) combining the per-leaf reductions. XLA's
instruction fusion duplicates cheap producers into each consumer fusion, so
every one of the ``N`` leaf fusions would get its own copy of the ``N``-long
chain: ``N**2`` instructions, and compile time quadratic in the leaf count
(minutes at 1024 leaves). It does not duplicate ops it deems expensive, and
``sqrt`` is one (this is why ``optax.clip_by_global_norm`` stays linear);
``lax.optimization_barrier`` does not help, the CPU pipeline removes it
before fusion. So every tree-wide scalar in this module passes through
:func:`materialised`, a ``sqrt`` that is computed once in its own fusion and
read by the leaf fusions as a parameter. Keep new tree-wide decisions on top
of these helpers (``tests/test_compile_scaling.py`` guards it).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optax_stab import _numerics


def safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt`` whose value and derivative are 0 at 0 (NaN and Inf propagate)."""
    zero = x == 0
    return jnp.where(zero, jnp.zeros_like(x), jnp.sqrt(jnp.where(zero, 1, x)))


def total_sqrt(total: jax.Array) -> jax.Array:
    """:func:`safe_sqrt` of a tree-wide sum, reading the sum only through sqrt.

    Same value and derivative as ``safe_sqrt(total)``; its zero test is made
    on :func:`materialised` ``(total)``, so consumers in every leaf never read
    the ``N``-long chain that built ``total`` (see the module note).
    """
    zero = jax.lax.stop_gradient(materialised(total)) == 0
    return jnp.where(zero, jnp.zeros_like(total), jnp.sqrt(jnp.where(zero, 1, total)))


def materialised(total: jax.Array) -> jax.Array:
    """``sqrt(total)`` of a non-negative tree-wide sum: one fusion, read by all.

    ``sqrt`` maps 0 to 0, positive values to positive values, and keeps NaN and
    Inf, so tests of zero, sign and finiteness on the result are exact tests
    on ``total``; XLA never duplicates it into the consumers.
    """
    return jnp.sqrt(total)


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
    return total_sqrt(_psum(total, axis_name))


def max_abs(tree: Any) -> jax.Array:
    """Largest ``|x|`` over every element of every float leaf, float32 scalar.

    NaN if any element is NaN, Inf if any is infinite (and none NaN), 0 for an
    empty tree. One fused reduction per leaf; read through :func:`materialised`
    by tree-wide consumers (see the module note).
    """
    out = jnp.zeros([], jnp.float32)
    for x in jax.tree.leaves(tree):
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.inexact) and x.size:
            # max propagates NaN in XLA; |x| >= 0, so 0 is a neutral start.
            out = jnp.maximum(out, jnp.max(jnp.abs(x)).astype(jnp.float32))
    return out


def all_finite(tree: Any, *, axis_name: Any = None) -> jax.Array:
    """Boolean scalar: every element of every leaf is finite (True if empty).

    Exact whatever the magnitudes (a finite ``1e30`` is finite). It reads
    every element once (:func:`max_abs`: on CPU a ``max`` reduction fuses with
    its ``abs`` where ``all(isfinite(x))`` takes several passes) and compiles
    in time linear in the leaf count.

    Args:
        tree: A pytree of arrays.
        axis_name: If given, the flags of all devices along this pmap or
            shard_map axis are AND-ed (one ``psum`` of a scalar), so a NaN in
            one device's shard makes the result False on every device.
    """
    ok = jnp.isfinite(materialised(max_abs(tree)))
    if axis_name is not None:
        ok = _psum((~ok).astype(jnp.int32), axis_name) == 0
    return ok


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
    n = jnp.stack([jnp.asarray(x) for x in leaves]).astype(jnp.float32)
    # The largest norm m, read through a sqrt (module note); the scale d is
    # the power of two at or below it (from r = sqrt(m)), so n / d is exact.
    r = materialised(jnp.max(n))
    ok = jnp.isfinite(r) & (r > 0)
    safe_r = jnp.where(ok, r, jnp.ones_like(r))
    e = jnp.clip(jnp.floor(2 * jnp.log2(safe_r)), -126, 127).astype(jnp.int32)
    d = jnp.ldexp(jnp.ones_like(r), e)
    total = d * total_sqrt(jnp.sum(jnp.square(n / d)))
    # Where not ok, m is 0, Inf or NaN, and r * r is exactly m.
    return jnp.where(ok, total, r * r)


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
