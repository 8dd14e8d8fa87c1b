"""``windowed_median``: a pruned compare-exchange selection network over a ring.

``jnp.median`` sorts a ``(W, ...)`` buffer: it is two orders of magnitude
slower than the network below (docs/benchmarks.md, "Median", has the measured
ratios) and needs a temporary as large as the buffer. The network is
Batcher's odd-even merge sort for ``W`` wires, pruned backwards to the
comparators that feed the two middle output wires, each comparator reduced to
the ``min`` or ``max`` that is actually read. It is one elementwise fusion of
``jnp.minimum``/``jnp.maximum`` that reads each slot once.

Warm-up: with ``n < W`` filled slots, the empty slots must hold values below
and above every real value (``-big`` and ``+big``) in the numbers that put
the network's fixed middle wires on the lower and upper median of the ``n``
real values. The ring is created holding them
(:func:`warmup_fill`), so the per-leaf kernel reads the raw slots with no
masking at all.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_stab import _fir, _ring, _validate

MAX_WINDOW = 32


@functools.cache
def batcher_network(n: int) -> tuple[tuple[int, int], ...]:
    """Comparators ``(a, b)``, ``a < b``, of a sorting network on ``n`` wires.

    After all comparators run (``a`` takes the min, ``b`` the max), wire ``i``
    holds the ``i``-th smallest input.
    """
    size = 1 << max(n - 1, 0).bit_length()
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    # Padding wires >= n would hold +inf, which never moves: drop them.
    return tuple((a, b) for a, b in pairs if b < n)


@functools.cache
def selection_network(
    n: int, outputs: tuple[int, ...]
) -> tuple[tuple[int, int, bool, bool], ...]:
    """The comparators of :func:`batcher_network` that feed ``outputs``.

    Returns:
        ``(a, b, need_min, need_max)`` tuples in execution order; ``need_min``
        says whether wire ``a``'s new value (the min) is read later, and
        ``need_max`` the same for wire ``b``.
    """
    needed = set(outputs)
    kept = []
    for a, b in reversed(batcher_network(n)):
        need_min, need_max = a in needed, b in needed
        if need_min or need_max:
            kept.append((a, b, need_min, need_max))
            needed.update((a, b))
    return tuple(reversed(kept))


def middle_pair(wires: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Order statistics ``m`` and ``m + 1`` (``m = (W - 1) // 2``) of ``W`` arrays.

    For ``W == 1`` both are the single input.
    """
    w = len(wires)
    m = (w - 1) // 2
    if w == 1:
        return wires[0], wires[0]
    wires = list(wires)
    for a, b, need_min, need_max in selection_network(w, (m, m + 1)):
        lo = jnp.minimum(wires[a], wires[b]) if need_min else None
        hi = jnp.maximum(wires[a], wires[b]) if need_max else None
        if need_min:
            wires[a] = lo
        if need_max:
            wires[b] = hi
    return wires[m], wires[m + 1]


def warmup_fill(window: int, dtype: Any) -> np.ndarray:
    """Initial slot values of a median ring of ``window`` slots of ``dtype``.

    ``-big`` on even slots and ``+big`` on odd ones, ``big`` the largest
    finite value of ``dtype``: it
    orders below or above every value the ring can hold (only finite values
    are pushed, so ties do not matter) and, unlike Inf, keeps state finite.

    With ``m = (W - 1) // 2``, sorted wires ``m`` and ``m + 1`` of ``n`` real
    values plus ``W - n`` pads are the lower and upper median of the real
    values iff ``m - (n - 1) // 2`` pads are low and the rest high. Pushes
    overwrite slots ``0, 1, ...`` in order, and that count drops by one
    exactly when an even slot is overwritten, so the pattern stays right for
    every ``n`` from 0 to ``W``; after wrap-around no pad is left.
    """
    big = float(jnp.finfo(dtype).max)
    return np.where(np.arange(window) % 2 == 0, -big, big)


def ring_median(ring: _ring.RingBuffer, like: Any) -> Any:
    """Coordinate-wise median of the filled slots of ``ring``.

    The ring's empty slots must hold the pads of :func:`warmup_fill`. With
    an even number ``n`` of filled slots it is the mean of the two middle
    values. The result takes the dtypes of the matching leaves of ``like``.
    """
    w = _ring.window_size(ring)
    even = ring.filled % 2 == 0

    def leaf(buf, ref):
        lo, hi = middle_pair([buf[s] for s in range(w)])
        lo32, hi32 = lo.astype(jnp.float32), hi.astype(jnp.float32)
        return jnp.where(even, 0.5 * (lo32 + hi32), lo32).astype(ref.dtype)

    return jax.tree.map(leaf, ring.values, like)


# ------------------------------------------------------------------ transform
class WindowedMedianState(NamedTuple):
    """State of :func:`windowed_median`.

    Attributes:
        ring: :class:`optax_stab._ring.RingBuffer` of the last ``window``
            finite gradients (``window x params`` elements).
    """

    ring: _ring.RingBuffer


def windowed_median(
    window: int = 5, *, accumulator_dtype: jax.typing.DTypeLike | None = None
) -> optax.GradientTransformationExtraArgs:
    r"""Coordinate-wise median of the last ``window`` gradients.

    The median keeps edges that a mean blurs and ignores isolated spikes: a
    single outlier of any size inside a window of 5 leaves the output within
    the range of the other values. With ``n_t = min(t, W)`` gradients seen, the
    output is their median (the mean of the two middle values for even
    ``n_t``), so step 1 returns the gradient itself.

    It is computed with a compare-exchange selection network (``jnp.minimum`` /
    ``jnp.maximum``), not a sort: one fused pass over the ring buffer, no
    temporary. Memory: ``window x params`` elements (``accumulator_dtype=
    jnp.bfloat16`` halves it for float32 params; comparisons are exact in the
    stored dtype). A step with any non-finite gradient is passed through
    unchanged and not stored. The empty slots of a new ring hold the largest
    finite values of either sign (the warm-up padding); they are never output.

    Args:
        window: Number of gradients; a static int in [1, 32].
        accumulator_dtype: dtype of the ring buffer; ``None`` keeps the param
            dtype.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
        ValueError: If ``window`` is not an int in [1, 32].
        TypeError: From ``init``, if a leaf is complex (a median needs an
            ordering) or not floating point.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax_stab
        >>> tx = optax_stab.windowed_median(3)
        >>> state = tx.init(jnp.zeros(2))
        >>> for g in ([1.0, 5.0], [1000.0, 6.0], [2.0, 7.0]):
        ...     u, state = tx.update(jnp.array(g), state)
        >>> print(u)
        [2. 6.]
    """
    _validate.check_int("window", window, low=1, high=MAX_WINDOW)
    return _fir.ring_filter(
        "windowed_median",
        window,
        accumulator_dtype,
        ring_median,
        WindowedMedianState,
        lambda dtype: warmup_fill(window, dtype),
        ordered=True,
    )
