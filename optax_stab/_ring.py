"""The ring buffer of the last W values, per leaf or of scalars.

Every windowed filter and every norm history in optax_stab stores its window
here. Slot ``s`` of a leaf's buffer holds the value pushed ``lags(ring)[s]``
pushes ago (lag 0 is the newest); slots with ``lag >= filled`` are not yet
written and must be ignored (``valid(ring)``).

A ring of a tree with no array leaves (``{}``, ``{"a": None}``) has no slots:
:func:`window_size` is 0, :func:`push` leaves it as it is, and every
per-leaf reduction maps over nothing, as ``optax`` transforms do on such trees.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_stab import _numerics

_UNROLL_MAX = 64


class RingBuffer(NamedTuple):
    """A window of the last ``W`` values of a pytree.

    Attributes:
        values: Pytree like the tracked tree, each leaf of shape
            ``(W, *leaf.shape)``; sharded like the tracked leaf.
        index: int32 scalar, the slot the next push writes.
        filled: int32 scalar, how many slots hold pushed values (saturates at W).
    """

    values: Any
    index: jax.Array
    filled: jax.Array


def _stack_zeros(x: jax.Array, window: int, dtype: Any, fill: Any) -> jax.Array:
    # broadcast_to(zeros_like(p)[None]) keeps the leaf's sharding on the
    # trailing axes; jnp.zeros((W,) + shape) would lose it.
    x = jnp.asarray(x)
    zeros = jnp.zeros_like(x, dtype=x.dtype if dtype is None else dtype)
    stacked = jnp.broadcast_to(zeros[None], (window, *x.shape))
    if fill is None:
        return stacked
    values = np.asarray(fill(stacked.dtype) if callable(fill) else fill)
    if values.shape != (window,):
        raise ValueError(f"`fill` must have shape ({window},), got {values.shape}.")
    return stacked + jnp.asarray(values, stacked.dtype).reshape(
        (window,) + (1,) * x.ndim
    )


def init(tree: Any, window: int, dtype: Any = None, fill: Any = None) -> RingBuffer:
    """An empty ring of ``window`` slots for each leaf of ``tree``.

    Pushes write slots ``0, 1, 2, ...`` in order, so after ``n < window``
    pushes slots ``n, ..., window - 1`` still hold their initial values.

    Args:
        tree: Pytree of arrays (or a scalar) whose shapes and shardings the
            slots copy.
        window: Number of slots, a static int >= 1.
        dtype: Slot dtype; ``None`` keeps each leaf's dtype.
        fill: Static initial value of each slot: ``window`` floats, or a
            function of the slot dtype returning them; ``None`` means zeros.
    """
    values = jax.tree.map(lambda x: _stack_zeros(x, window, dtype, fill), tree)
    return RingBuffer(values, _numerics.zero_count(), _numerics.zero_count())


def init_scalar(window: int, dtype: Any = jnp.float32) -> RingBuffer:
    """An empty ring of ``window`` scalars (a norm or loss history)."""
    return init(jnp.zeros([], dtype), window)


def window_size(ring: RingBuffer) -> int:
    """The static number of slots; 0 for the ring of a tree without leaves."""
    leaves = jax.tree.leaves(ring.values)
    return leaves[0].shape[0] if leaves else 0


def push(ring: RingBuffer, tree: Any, where: Any = True) -> RingBuffer:
    """Writes ``tree`` into the next slot; a no-op where ``where`` is False.

    Values are cast to the slot dtype. ``filled`` saturates at the window size.
    A ring without slots (an empty tree) comes back unchanged.
    """
    w = window_size(ring)
    if w == 0:
        return ring
    where = jnp.asarray(where)

    # A skipped push writes out of bounds, which the scatter drops: no kernel
    # reads the old slot to write it back (that read is a kernel per leaf).
    slot = jnp.where(where, ring.index, w)

    def write(buf, x):
        x = jnp.asarray(x).astype(buf.dtype)
        return buf.at[slot].set(x, mode="drop")

    values = jax.tree.map(write, ring.values, tree)
    index = jnp.where(where, (ring.index + 1) % w, ring.index).astype(jnp.int32)
    filled = jnp.where(where, jnp.minimum(ring.filled + 1, w), ring.filled)
    return RingBuffer(values, index, filled.astype(jnp.int32))


def next_slot(ring: RingBuffer) -> Any:
    """The values in the slot the next push overwrites (the oldest once full).

    While the ring is not full this is a slot's initial value.
    """
    return jax.tree.map(
        lambda buf: jax.lax.dynamic_index_in_dim(buf, ring.index, keepdims=False),
        ring.values,
    )


def lags(ring: RingBuffer) -> jax.Array:
    """int32 ``(W,)``: how many pushes ago each slot was written (0 = newest)."""
    w = window_size(ring)
    newest = ring.index - 1
    return ((newest - jnp.arange(w, dtype=jnp.int32)) % w).astype(jnp.int32)


def valid(ring: RingBuffer) -> jax.Array:
    """bool ``(W,)``: which slots hold pushed values."""
    return lags(ring) < ring.filled


def slot_weights(ring: RingBuffer, lag_weights: jax.Array) -> jax.Array:
    """Per-slot weights from per-lag weights, renormalised over filled slots.

    Args:
        ring: The ring, after the newest push.
        lag_weights: ``(W,)`` weights, ``lag_weights[k]`` for lag ``k``.

    Returns:
        ``(W,)`` weights in ``lag_weights``' dtype that are zero on unfilled
        slots and sum to one over the filled ones.
    """
    w = lag_weights[lags(ring)]
    w = jnp.where(valid(ring), w, jnp.zeros_like(w))
    return w / jnp.sum(w)


def weighted_sum(
    ring: RingBuffer, weights: jax.Array, like: Any, dtype: Any = None
) -> Any:
    """``sum_s weights[s] * values[s]`` per leaf, computed in ``dtype``.

    ``dtype=None`` computes each leaf in float32, or in its own dtype if that
    is wider or complex (:func:`optax_stab._numerics.compute_dtype`). The
    result takes the dtypes of the matching leaves of ``like``.
    """

    n = window_size(ring)
    # The slot weights as scalars, sliced once for all leaves: every op traced
    # per leaf is compiled once per leaf.
    scalars = {}

    def weight(ct, s):
        if ct not in scalars:
            w = weights.astype(ct)
            scalars[ct] = [w[k] for k in range(n)]
        return scalars[ct][s]

    def combine(buf, ref):
        ct = _numerics.compute_dtype(buf.dtype) if dtype is None else dtype
        if n <= _UNROLL_MAX:
            # One elementwise fusion reading each slot once; XLA's reduction
            # over a leading axis is several times slower on CPU.
            slots = [x.astype(ct) for x in jnp.unstack(buf)]
            acc = weight(ct, 0) * slots[0]
            for s in range(1, n):
                acc = acc + weight(ct, s) * slots[s]
        else:
            w = weights.astype(ct)
            wb = w.reshape((-1,) + (1,) * (buf.ndim - 1))
            acc = jnp.sum(wb * buf.astype(ct), axis=0)
        return acc.astype(ref.dtype)

    return jax.tree.map(combine, ring.values, like)


def masked_mean_std(ring: RingBuffer) -> tuple[jax.Array, jax.Array]:
    """Mean and population std over the filled slots of a scalar ring.

    Both are 0 while the ring is empty.
    """
    values = ring.values
    ok = valid(ring)
    n = jnp.maximum(ring.filled, 1).astype(values.dtype)
    x = jnp.where(ok, values, jnp.zeros_like(values))
    mean = jnp.sum(x) / n
    var = jnp.sum(jnp.where(ok, jnp.square(values - mean), 0)) / n
    return mean, jnp.sqrt(var)


def masked_percentile(ring: RingBuffer, q: jax.Array) -> jax.Array:
    """Percentile ``q`` (in [0, 100]) over the filled slots of a scalar ring.

    Matches ``numpy.percentile(values, q)`` (method ``"linear"``) over the
    ``filled`` values pushed, whatever their slot order; 0 while the ring is
    empty. Pushed values must not be NaN.
    """
    values = ring.values
    n = ring.filled
    last = jnp.maximum(n - 1, 0)
    ordered = jnp.sort(jnp.where(valid(ring), values, jnp.inf))
    pos = jnp.asarray(q).astype(values.dtype) / 100 * last.astype(values.dtype)
    lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, last)
    hi = jnp.minimum(lo + 1, last)
    t = pos - lo.astype(values.dtype)
    a, b = ordered[lo], ordered[hi]
    # numpy's _lerp: interpolate from the nearer end, for monotonicity.
    out = jnp.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)
    return jnp.where(n > 0, out, jnp.zeros_like(out))
