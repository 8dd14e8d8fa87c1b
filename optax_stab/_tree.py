r"""Pytree norms accumulated in float32, zero-safe, overflow-safe, complex-aware.

**Range.** A norm is first computed the fast way, one fused pass of plain
squares per leaf. Only where that sum overflowed (elements beyond about
``1.8e19`` in float32) or fell below ``2**-63`` (where squares of elements
under ``1e-19`` flush to zero) is it recomputed once more, from squares scaled
by an exact power of two (as LAPACK's ``nrm2`` scales), under a ``lax.cond``
on the scalar sum: the common step pays one predicate, not a second pass
(under ``vmap`` the cond becomes a select and both passes run). So every
finite tree whose norm is below float32's max (about ``3.4e38``) gets its norm
to float32 rounding, and only a NaN or Inf element (or a norm beyond float32's
range) gives a non-finite norm. Complex leaves contribute
:math:`|z|^2 = \mathrm{re}^2 + \mathrm{im}^2`.

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
of these helpers (``tests/test_compile_scaling.py`` guards it). A decision
built from the sums by a chain of scalar ops (a guard's skip flag from its
histories, a clipper's "clip" flag from an adaptive limit) is not an
``N``-long chain, but copied into each leaf's kernel it still costs a
constant per leaf, 139 instructions for ``spike_guard``: :func:`decided`
reads it through :func:`materialised` too.

**Small leaves.** XLA's CPU backend emits a reduction over fewer than 4096
elements as three kernels (the elementwise part, a partial ``reduce-window``
and a final ``reduce``), and a larger one as a single fused kernel. A model's
many small leaves (biases, norm scales) would then cost three compiled kernels
and three launches each for every tree-wide scalar. :func:`aligned_groups`
therefore reduces the leaves under :data:`SMALL_LEAF` elements together,
stacked per shape and dtype (one fused kernel for each such group), and the
larger leaves one by one; tree-wide sums (:func:`global_norm`,
:func:`total`, :func:`all_finite`) are built on it. An elementwise function
of the leaves is applied to the stacked group, not leaf by leaf: XLA splits
a sum over a stack of computed per-leaf arrays back into one small
reduction per leaf.

**Per-leaf kernels.** XLA:CPU compiles a fused kernel once for all the
fusions that are the same computation, and every other one on its own, at
about 6 ms each (256 leaves of 1K: ``x * 2`` in every leaf 0.07 s, ``x * (i
+ 1)`` 1.63 s); and its HLO passes cost time for every instruction of every
leaf (docs/benchmarks.md, "What a leaf costs to compile"). A slice ``v[i]``
of one vector of per-leaf scalars makes each leaf's kernel its own (scaling
every leaf by ``v[i]``: 1.77 s, by separate scalar inputs 0.09 s), so
per-leaf results that feed per-leaf kernels (:func:`leaf_norms`) keep one
plain reduction per leaf, as separate scalars. Results that are only
reduced or stored come as one vector (:func:`leaf_norm_vector`), whose
plain sums reduce the small leaves stacked, one kernel per stack, as
:func:`aligned_groups` does: ``health_monitor``'s lower+compile on 1024
leaves of 1K took 18.7 s with separate scalars, 10.8 s with the vector of
per-leaf sums and 8.4 s with stacked sums (the twin,
``optax.clip_by_global_norm``: 5.2 s), and ``chain(health_monitor(), adam)``
plus ``apply_updates`` ran at 1.43-1.47x Adam's step on those leaves instead
of 1.69x. ``adaptive_tensor_clip``, whose per-leaf clips read the norms,
compiled in 26.7 s against 11.2 s from a vector at 512 leaves. Both rescue
the leaves' sums in one branch (:func:`_rescued_leaf_sums`), small leaves
summed stacked. On 1024 leaves of 1K, jitted alone: :func:`leaf_norms`
compiled in 13.0 s (14.7 s when the rescue summed leaf by leaf) and ran in
5.1 ms, 5.9 ms when a zero leaf takes the rescue (6.5 and 7.2 ms before).

**Squares of their own.** A norm taken of the raw gradients that an inner
optimizer then squares too (``spike_guard(adam)``, ``chain(health_monitor(),
adam)``) would share its ``g * g`` with Adam's ``g**2``: XLA's common
subexpression elimination merges the two, and the merged square, read by the
norm's reduction and by Adam's update, is written out in full as a temporary.
On XLA:CPU that temporary is fresh memory on every step: at 8M float32 in 16
leaves, ``spike_guard(adam)`` plus ``apply_updates`` took 1.9-3.9x Adam's
step, with 5300-7800 page faults per step. :func:`squared_norm` therefore
squares its input behind ``lax.optimization_barrier`` when compiled for
CPU, which the merge does not see through (the CPU pipeline removes the
barrier only after it, before fusion): 1.18-1.21x, no page faults, and a
lone norm as fast as before (``docs/benchmarks.md``, "A norm's own
square"). Other spellings of the square that XLA
does not merge (``-(x * -x)``, ``(x / 2)**2 * 4``) cost 15-20% more in every
norm. On GPU the barrier is left out (``lax.platform_dependent``): XLA:GPU
fuses the shared square into one kernel with both consumers, and keeps the
barrier through fusion, where it costs a full write and read of a norm's
input whenever that input is computed in the same step (an H200 at 256M
float32: ``chain(adam, clip_by_norm)`` 1.4x Adam's step without the barrier,
1.7x with it; ``spike_guard(adam)`` 1.3x either way).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_stab import _numerics

SMALL_LEAF = 4096
"""Leaves with fewer elements are reduced together (module note, "Small leaves")."""


def aligned_groups(*trees: Any) -> list[tuple[jax.Array, ...]]:
    """Leaves of aligned pytrees grouped for tree-wide sums (module note).

    Leaf ``i`` of every tree lands in the same group. Leaves of
    :data:`SMALL_LEAF` elements or more come back as they are; the smaller
    ones stacked along a new axis, one group per shape and dtype (in every
    tree): a stack keeps each leaf's sharding, where raveling and
    concatenating leaves of different shapes made GSPMD gather them. Empty
    leaves are dropped. Returns one tuple (an array per tree) per group.
    """
    flat = [[jnp.asarray(x) for x in jax.tree.leaves(t)] for t in trees]
    alone, stacks = _leaf_groups(flat)
    groups = [tuple(leaves[i] for leaves in flat) for i in alone if flat[0][i].size]
    for idx in stacks:
        groups.append(tuple(jnp.stack([leaves[i] for i in idx]) for leaves in flat))
    return groups


def _leaf_groups(flat: list[list[jax.Array]]) -> tuple[list[int], list[list[int]]]:
    """Indices of the leaves reduced one by one, and of the stacks of small ones.

    ``flat`` holds the leaves of aligned trees. A leaf of :data:`SMALL_LEAF`
    elements or more (or none) is reduced alone; the smaller ones are stacked
    per shape and dtype in every tree.
    """
    alone: list[int] = []
    small: dict[Any, list[int]] = {}
    for i, x in enumerate(flat[0]):
        if x.size >= SMALL_LEAF or not x.size:
            alone.append(i)
        else:
            key = tuple((leaves[i].shape, leaves[i].dtype) for leaves in flat)
            small.setdefault(key, []).append(i)
    return alone, list(small.values())


def reduction_groups(tree: Any) -> list[jax.Array]:
    """The arrays whose reductions make a tree-wide sum or maximum.

    :func:`aligned_groups` of one tree. Any reduction that is associative
    over elements (a sum, a maximum) gives the same tree-wide result over
    these arrays as over the leaves, up to the order of a float sum.
    """
    return [group[0] for group in aligned_groups(tree)]


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


def decided(flag: jax.Array) -> jax.Array:
    """A tree-wide boolean decision, computed once for every leaf's kernel.

    A guard's decision is a chain of scalar ops (its histories' statistics,
    z-scores, the run bound); a select on it in every leaf's kernel would get
    its own copy of that chain (module note). Read through
    :func:`materialised`, the leaf kernels take it as a parameter: on 1024
    leaves of 1K, ``spike_guard(adam)`` compiled in 7.0 s instead of 13.3 s.
    """
    return materialised(jnp.asarray(flag, jnp.float32)) > 0


def _abs2(x: jax.Array, dtype: Any, scale: Any = None) -> jax.Array:
    """Elementwise ``|x * scale|**2`` in ``dtype``; complex ``x``: re² + im²."""
    x = jnp.asarray(x)
    parts = (jnp.real(x), jnp.imag(x)) if jnp.iscomplexobj(x) else (x,)
    out = None
    for part in parts:
        part = part.astype(dtype)
        if scale is not None:
            part = part * scale
        out = jnp.square(part) if out is None else out + jnp.square(part)
    return out


def squared_norm(
    x: jax.Array, dtype: Any = None, scale: Any = None, axes: Any = None
) -> jax.Array:
    """Sum of ``|x * scale|**2`` over ``axes`` of one array (default all).

    In ``dtype`` (default float32). The plain one-pass sum: without ``scale``
    it overflows to Inf for elements beyond about ``1.8e19`` and drops
    elements under about ``1e-19``; :func:`leaf_norms` and
    :func:`global_norm` rescue both. Complex elements contribute
    ``re**2 + im**2``.
    """
    dtype = _numerics.resolve_dtype(dtype)
    if scale is None:  # module note, "Squares of their own"
        x = jax.lax.platform_dependent(
            jnp.asarray(x), cpu=jax.lax.optimization_barrier, default=lambda x: x
        )
    return jnp.sum(_abs2(x, dtype, scale), axis=axes, dtype=dtype)


def _psum(x: jax.Array, axis_name: Any) -> jax.Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _low(dtype: Any) -> float:
    # 2**(minexp/2): below it, squares of elements may have flushed to zero.
    return 2.0 ** (jnp.finfo(dtype).minexp // 2)


def _needs_rescue(total: jax.Array) -> jax.Array:
    """A plain sum of squares overflowed (Inf) or may have lost underflows.

    NaN is final: the norm is NaN either way.
    """
    return (total < _low(total.dtype)) | jnp.isinf(total)


def _rescue_scale(total: jax.Array) -> jax.Array:
    """The exact power of two that elements are scaled by before squaring again.

    Inf: ``2**(-3 maxexp/4)`` (``2**-96`` in float32), so float32's max squares
    to ``2**64``, and the elements lost to underflow (below ``2**33``) add at
    most ``2**-62`` each relative to a sum of ``2**128`` or more. Below
    ``2**(minexp/2)``: ``2**(-minexp/2)`` (``2**63``); every element is then
    below ``2**-31.5``, its scaled square below ``2**63``, and only subnormal
    elements are lost. 1 otherwise (reached only when ``vmap`` turns the cond
    into a select).
    """
    fi = jnp.finfo(total.dtype)
    down = jnp.asarray(2.0 ** -(3 * fi.maxexp // 4), total.dtype)
    up = jnp.asarray(2.0 ** (-fi.minexp // 2), total.dtype)
    low = total < _low(total.dtype)
    return jnp.where(jnp.isinf(total), down, jnp.where(low, up, jnp.ones_like(up)))


def _sum_squares(leaves: list, axis_name: Any, dtype: Any, scale: Any = None):
    parts = (squared_norm(x, dtype, scale) for x in leaves)
    return _psum(sum(parts, jnp.zeros([], dtype)), axis_name)


# The branches of the two ``lax.cond`` below are built once per (axis_name,
# dtype) and take everything they read as operands: a branch defined anew at
# each call is traced and compiled anew at each eager (un-jitted) call, about
# 50 ms on CPU, where these hit JAX's caches.
@functools.cache
def _global_norm_branches(axis_name: Any, dtype: Any):
    def slow(total, leaves):
        c = _rescue_scale(total)
        return total_sqrt(_sum_squares(leaves, axis_name, dtype, c)) / c  # exact

    def fast(total, leaves):
        del leaves
        return total_sqrt(total)

    return slow, fast


def _rescued_leaf_sums(
    totals: jax.Array, leaves: list, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """Each leaf's sum of squares again, scaled by its own power of two.

    ``totals`` is the vector of the leaves' plain sums; a leaf that needs no
    rescue is scaled by 1. The small leaves are summed stacked per shape and
    dtype (one kernel per stack), each row scaled by its leaf's factor
    (module note, "Per-leaf kernels", for the figures). Returns the vector of
    scaled sums in leaf order, and the vector of factors.
    """
    c = _rescue_scale(totals)
    return _stacked_leaf_sums(leaves, dtype, c), c


def _stacked_leaf_sums(leaves: list, dtype: Any, c: Any = None) -> jax.Array:
    """Each leaf's sum of squares (scaled by ``c[i]``), as a vector in leaf order.

    The small leaves are summed stacked per shape and dtype, one kernel per
    stack.
    """
    alone, stacks = _leaf_groups([leaves])
    parts, order = [], []
    for i in alone:
        parts.append(squared_norm(leaves[i], dtype, None if c is None else c[i])[None])
        order.append(i)
    for idx in stacks:
        x = jnp.stack([leaves[i] for i in idx])
        rows = None
        if c is not None:
            rows = c[np.asarray(idx)].reshape((-1,) + (1,) * (x.ndim - 1))
        parts.append(squared_norm(x, dtype, rows, axes=tuple(range(1, x.ndim))))
        order += idx
    return jnp.concatenate(parts)[np.argsort(np.asarray(order))]


@functools.cache
def _leaf_norm_branches(axis_name: Any, dtype: Any):
    def vector_slow(totals, leaves):
        sums, c = _rescued_leaf_sums(totals, leaves, dtype)
        rescued = total_sqrt(_psum(sums, axis_name)) / c
        return jnp.where(_needs_rescue(totals), rescued, safe_sqrt(totals))

    def vector_fast(totals, leaves):
        del leaves
        return safe_sqrt(totals)

    def slow(totals, leaves):
        return list(jnp.unstack(vector_slow(jnp.stack(totals), leaves)))

    def fast(totals, leaves):
        del leaves
        return [safe_sqrt(t) for t in totals]

    return (slow, fast), (vector_slow, vector_fast)


def _leaf_norm_inputs(tree: Any, dtype: Any):
    """The leaves' plain sums of squares, the leaves and the tree structure."""
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [jnp.asarray(x) for x in leaves]
    return [squared_norm(x, dtype) for x in leaves], leaves, treedef


def leaf_norms(tree: Any, *, axis_name: Any = None, dtype: Any = None) -> Any:
    """Per-leaf L2 norms (a pytree of scalars), zero- and overflow-safe.

    Each leaf's norm is exact to float32 rounding over the range of
    :func:`global_norm`; complex elements count :math:`|z|^2`. For
    consumers that work leaf by leaf (each norm a separate scalar: module
    note, "Per-leaf kernels"); :func:`leaf_norm_vector` for those that
    reduce or store them.

    Args:
        tree: A pytree of arrays of any float or complex dtype.
        axis_name: If given, squared norms are summed across this pmap or
            shard_map axis before the square root, so a leaf split over
            devices gets its full norm.
        dtype: Accumulation dtype; ``None`` means float32.
    """
    dtype = _numerics.resolve_dtype(dtype)
    sums, leaves, treedef = _leaf_norm_inputs(tree, dtype)
    if not leaves:
        return jax.tree.unflatten(treedef, [])
    totals = [_psum(x, axis_name) for x in sums]
    # One cond for the whole tree: the common step pays one predicate.
    (slow, fast), _ = _leaf_norm_branches(axis_name, dtype)
    rescue = any_leaf([_needs_rescue(t) for t in totals])
    return jax.tree.unflatten(treedef, jax.lax.cond(rescue, slow, fast, totals, leaves))


def leaf_norm_vector(
    tree: Any, *, axis_name: Any = None, dtype: Any = None
) -> jax.Array:
    """The norms of :func:`leaf_norms` as one vector, in leaf order.

    The same values. The plain sums of the small leaves are taken stacked
    (one kernel per stack), and all are rescued as one vector (one ``psum``
    across ``axis_name``), which compiles and runs faster than separate
    scalars when the norms are reduced or stored, and compiles slower when
    each feeds its own leaf's kernel (module note, "Per-leaf kernels").
    """
    dtype = _numerics.resolve_dtype(dtype)
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
    if not leaves:
        return jnp.zeros([0], dtype)
    totals = _psum(_stacked_leaf_sums(leaves, dtype), axis_name)
    _, (slow, fast) = _leaf_norm_branches(axis_name, dtype)
    return jax.lax.cond(jnp.any(_needs_rescue(totals)), slow, fast, totals, leaves)


def global_norm(tree: Any, *, axis_name: Any = None, dtype: Any = None) -> jax.Array:
    """Global L2 norm of a pytree, accumulated in float32 whatever the leaf dtype.

    Unlike ``optax.tree.norm`` on bfloat16 leaves, the sum of squares never
    rounds to bfloat16: 1000 leaves of ``ones(1000, bfloat16)`` give 1000.
    Finite elements of any magnitude give the norm to float32 rounding (see
    the module note); complex elements count :math:`|z|^2`. The value and its
    derivative are 0 (not NaN) at an all-zero tree; NaN and Inf elements
    propagate, and a norm beyond float32's max (about ``3.4e38``) is Inf.
    """
    dtype = _numerics.resolve_dtype(dtype)
    leaves = reduction_groups(tree)
    total = _sum_squares(leaves, axis_name, dtype)
    # The rare branch sums the squares again, scaled by a power of two.
    slow, fast = _global_norm_branches(axis_name, dtype)
    return jax.lax.cond(_needs_rescue(total), slow, fast, total, leaves)


def total(tree: Any, fn: Any = None, *more: Any) -> jax.Array:
    """Sum of ``fn(x, *ys)`` over every element of every float leaf, float32.

    ``fn`` (default: the identity) is elementwise; its arguments are the
    aligned leaves of ``tree`` and of the trees in ``more`` (same structure
    and shapes). Complex results count ``re + im``; an empty tree gives 0.
    ``fn`` runs on the stacked :func:`aligned_groups`, so each group is one
    fused reduction reading the leaves once (applied leaf by leaf and then
    stacked, XLA splits the sum back into one small reduction per leaf).
    Read the result through :func:`materialised` where every leaf consumes
    it (see the module note). Sums, not maxima, carry the tree-wide flags
    here: XLA:CPU (jaxlib 0.10.2) drops NaN from a ``max`` reduction over
    4096 or more elements, while a sum keeps it.
    """
    out = jnp.zeros([], jnp.float32)
    for arrays in aligned_groups(tree, *more):
        if jnp.issubdtype(arrays[0].dtype, jnp.inexact):
            x = arrays[0] if fn is None else fn(*arrays)
            if jnp.iscomplexobj(x):
                x = jnp.real(x) + jnp.imag(x)
            out = out + jnp.sum(x, dtype=jnp.float32)
    return out


def nonfinite_marker(x: jax.Array) -> jax.Array:
    """``x - x``: 0 where an element is finite, NaN where it is NaN or +-Inf.

    A complex element is marked NaN when either part is not finite (its
    modulus may overflow while both parts are finite; that is finite here).
    """
    if jnp.iscomplexobj(x):
        return nonfinite_marker(jnp.real(x)) + nonfinite_marker(jnp.imag(x))
    # x - x, not x * 0: XLA:CPU's reduction kernel reads the 0 as a second
    # full-size array (at 8M float32 in 16 leaves the sum took 1.6 ms, against
    # 1.2 ms for x - x).
    return x - x


def all_finite(tree: Any, *, axis_name: Any = None) -> jax.Array:
    """Boolean scalar: every element of every leaf is finite (True if empty).

    Exact whatever the magnitudes (a finite ``3e38`` is finite): the
    :func:`total` of :func:`nonfinite_marker` is 0, or NaN as soon as one
    element is not finite. It reads every element once and compiles in time
    linear in the leaf count, with one kernel for all the small leaves.

    Args:
        tree: A pytree of arrays.
        axis_name: If given, the flags of all devices along this pmap or
            shard_map axis are AND-ed (one ``psum`` of a scalar), so a NaN in
            one device's shard makes the result False on every device.
    """
    ok = jnp.isfinite(materialised(total(tree, nonfinite_marker)))
    if axis_name is not None:
        ok = _psum((~ok).astype(jnp.int32), axis_name) == 0
    return ok


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


def extrema(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(min, max)`` of an array; both NaN if any element is NaN.

    ``jnp.min`` and ``jnp.max`` are not enough: XLA:CPU (jaxlib 0.10.2) drops
    NaN from a ``min`` or ``max`` reduction over 4096 or more elements (a
    stack of per-leaf norms of a model with that many leaves). The NaN test
    is an integer count, which no backend reorders.
    """
    has_nan = jnp.sum(jnp.isnan(v), dtype=jnp.int32) > 0
    nan = jnp.full([], jnp.nan, v.dtype)
    return jnp.where(has_nan, nan, jnp.min(v)), jnp.where(has_nan, nan, jnp.max(v))


def split_ratio(num: jax.Array, den: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``num / den`` as ``(pre, factor)``, ``pre`` an exact power of two.

    XLA on CPU flushes subnormal results to zero, so a plain ratio below
    float32's normal range (a norm of ``3e38`` clipped to 1) would scale a
    tree to zeros. Where ``den > 2**64``, ``pre = 2**-64`` and ``factor =
    num / (den * 2**-64)``; otherwise ``pre = 1`` and ``factor = num / den``,
    so ``(x * pre) * factor`` is ``x * (num / den)`` bit for bit.
    """
    big = den > 2.0**64
    pre = jnp.where(big, 2.0**-64, 1.0).astype(den.dtype)
    return pre, num / (den * pre)


def scale_where(
    tree: Any, pred: jax.Array, factor: jax.Array, pre: jax.Array | None = None
) -> Any:
    """Leaf-wise ``(x * pre) * factor`` where ``pred`` holds, else ``x`` bit for bit.

    The product is computed in float32 (or the leaf's wider or complex dtype)
    and cast back, so a bfloat16 leaf is rounded once and a complex leaf stays
    complex. ``pre`` (default 1) is an exact power of two from
    :func:`split_ratio`. ``factor`` is only read where ``pred`` holds, so an
    Inf or NaN factor elsewhere leaks into neither the value nor its
    derivative.
    """

    def one(x):
        if jnp.iscomplexobj(x):
            ct = x.dtype
        else:
            ct = _numerics.compute_dtype(x.dtype)
        f = jnp.where(pred, factor, jnp.ones_like(factor)).astype(ct)
        y = x.astype(ct)
        if pre is not None:
            y = y * pre.astype(ct)
        return jnp.where(pred, (y * f).astype(x.dtype), x)

    return jax.tree.map(one, tree)


def clip_to_norm(
    tree: Any, norm: jax.Array, max_norm: jax.Array
) -> tuple[Any, jax.Array]:
    """Scales ``tree`` (of norm ``norm``) down to ``max_norm`` when above it.

    Returns ``(tree, clipped)``. Where ``norm <= max_norm`` or ``norm`` is not
    finite, the leaves come back bit for bit; ``max_norm = 0`` with
    ``norm = 0`` is not a clip (no 0/0). ``max_norm`` may be ``inf``. Any
    finite ``norm`` is clipped to ``max_norm`` however large the ratio
    (:func:`split_ratio`).
    """
    # Read by every leaf's kernel; max_norm may come from a long chain of
    # scalar ops (a history's statistics): computed once (see decided).
    clipped = decided(jnp.isfinite(norm) & (norm > max_norm))
    pre, factor = split_ratio(max_norm, jnp.where(clipped, norm, jnp.ones_like(norm)))
    return scale_where(tree, clipped, factor, pre), clipped


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
