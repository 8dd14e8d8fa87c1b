"""Median over a ring buffer by a pruned compare-exchange selection network.

``jnp.median`` sorts a ``(W, ...)`` buffer: it is 90-160x slower than the
network below and needs a temporary as large as the buffer. The network is
Batcher's odd-even merge sort for ``W`` wires, pruned backwards to the
comparators that feed the two middle output wires, each comparator reduced to
the ``min`` or ``max`` that is actually read. It is one elementwise fusion of
``jnp.minimum``/``jnp.maximum`` that reads each slot once.

Warm-up: with ``n < W`` filled slots, the empty slots are padded with ``-inf``
and ``+inf`` so that the network's fixed middle wires land on the lower and
upper median of the ``n`` real values.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from optax_stab import _ring

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


def ring_median(ring: _ring.RingBuffer, like: Any) -> Any:
    """Coordinate-wise median of the filled slots of ``ring``.

    With an even number ``n`` of filled slots it is the mean of the two middle
    values. The result takes the dtypes of the matching leaves of ``like``.
    """
    w = _ring.window_size(ring)
    n = ring.filled
    m = (w - 1) // 2
    lag = _ring.lags(ring)
    # Empty slots: the first ``pad_low`` (by lag) get -inf, the rest +inf, so
    # that sorted wires m and m+1 are the lower and upper median of n values.
    pad_low = m - (n - 1) // 2
    is_valid = lag < n
    low_pad = (lag - n) < pad_low
    even = n % 2 == 0

    def leaf(buf, ref):
        inf = jnp.asarray(jnp.inf, buf.dtype)
        wires = [
            jnp.where(is_valid[s], buf[s], jnp.where(low_pad[s], -inf, inf))
            for s in range(w)
        ]
        lo, hi = middle_pair(wires)
        lo32, hi32 = lo.astype(jnp.float32), hi.astype(jnp.float32)
        return jnp.where(even, 0.5 * (lo32 + hi32), lo32).astype(ref.dtype)

    return jax.tree.map(leaf, ring.values, like)
