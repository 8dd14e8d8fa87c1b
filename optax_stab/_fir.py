"""Windowed linear filters over the ring buffer: FIR, moving average, Gaussian.

Like every filter in optax_stab they run over **time**, per coordinate. A step
whose gradients hold any NaN or Inf passes through unchanged and is not
stored.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_stab import _numerics, _ring, _tree, _validate


class FirSmoothingState(NamedTuple):
    """State of :func:`fir_smoothing`, :func:`moving_average` and
    :func:`gaussian_smoothing`.

    Attributes:
        ring: :class:`optax_stab._ring.RingBuffer` of the last ``window``
            finite gradients (``window x params`` elements).
    """

    ring: _ring.RingBuffer


def ring_filter(
    name: str,
    window: int,
    accumulator_dtype,
    combine,
    state_cls,
    fill=None,
    *,
    ordered: bool = False,
):
    """A filter over a ring of the last ``window`` finite gradients.

    ``combine(ring, like)`` reduces the ring (newest gradient pushed) to the
    smoothed updates; ``state_cls`` wraps the ring; ``fill`` is the ring's
    initial slot values (:func:`optax_stab._ring.init`). ``name`` and
    ``ordered`` go to :func:`optax_stab._validate.check_tree`.
    """

    def init_fn(params):
        _validate.check_tree(
            name, params, ordered=ordered, store_dtype=accumulator_dtype
        )
        return state_cls(_ring.init(params, window, accumulator_dtype, fill))

    def update_fn(updates, state, params=None, **extra_args):
        _validate.check_tree(
            name,
            updates,
            state.ring.values,
            ordered=ordered,
            lead_axes=1,
            params=params,
        )
        del params, extra_args
        finite = _tree.all_finite(updates)
        ring = _ring.push(state.ring, updates, where=finite)
        smoothed = combine(ring, updates)
        return optax.tree.where(finite, smoothed, updates), state_cls(ring)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _fir(name: str, window: int, lag_weights_fn, accumulator_dtype):
    def combine(ring, like):
        weights = _ring.slot_weights(ring, lag_weights_fn())
        return _ring.weighted_sum(ring, weights, like=like)

    return ring_filter(name, window, accumulator_dtype, combine, FirSmoothingState)


def fir_smoothing(
    weights: Any, *, accumulator_dtype: jax.typing.DTypeLike | None = None
) -> optax.GradientTransformationExtraArgs:
    r"""Smooths gradients over time with any causal FIR filter.

    .. math::
        u_t = \frac{\sum_{k < n_t} w_k\, g_{t-k}}{\sum_{k < n_t} w_k},
        \qquad n_t = \min(t, W),

    so during warm-up the filter uses the :math:`n_t` gradients it has, and
    step 1 returns the gradient itself. Gradients are stored in a ring buffer
    (``window x params`` elements, ``window = len(weights)``) in
    ``accumulator_dtype``; the weighted sum is computed in float32. A step with
    any non-finite gradient is passed through unchanged and not stored.

    Args:
        weights: Static 1-D vector; ``weights[k]`` weighs lag ``k`` (0 is the
            current gradient). Every prefix sum must be non-zero.
        accumulator_dtype: dtype of the ring buffer; ``None`` keeps the param
            dtype.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
        ValueError: If ``weights`` is empty, not finite, or has a zero prefix sum.
        ValueError: From ``update``, if the updates' tree or shapes differ from
            the state's or the params'.
        TypeError: From ``init``, if a leaf is not floating point, or is
            complex while ``accumulator_dtype`` is real.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax_stab
        >>> tx = optax_stab.fir_smoothing([2.0, 1.0, 1.0])
        >>> state = tx.init(jnp.zeros(1))
        >>> for g in (4.0, 8.0, 0.0):
        ...     u, state = tx.update(jnp.array([g]), state)
        >>> print(u)  # (2 * 0 + 8 + 4) / 4
        [3.]

    .. seealso:: :func:`moving_average`, :func:`gaussian_smoothing`.
    """
    w = _validate.check_weights("weights", weights)
    w32 = w.astype(np.float32)
    return _fir("fir_smoothing", len(w), lambda: jnp.asarray(w32), accumulator_dtype)


class MovingAverageState(NamedTuple):
    """State of :func:`moving_average`.

    Attributes:
        ring: :class:`optax_stab._ring.RingBuffer` of the last ``window``
            finite gradients (``window x params`` elements).
        total: Running sum of the gradients in the ring except the one the
            next push overwrites (the ``window - 1`` newest once full), like
            the params in float32 (or the params' wider dtype).
        block: Sum of the gradients pushed since the ring last wrapped to
            slot 0, same dtype as ``total``.
    """

    ring: _ring.RingBuffer
    total: Any
    block: Any


def moving_average(
    window: int = 8, *, accumulator_dtype: jax.typing.DTypeLike | None = None
) -> optax.GradientTransformationExtraArgs:
    r"""Mean of the last ``window`` gradients, per coordinate.

    :math:`u_t = \frac{1}{n_t}\sum_{k<n_t} g_{t-k}` with
    :math:`n_t = \min(t, W)`: the mean of the gradients seen so far during
    warm-up, so step 1 returns the gradient itself. A step with any
    non-finite gradient is passed through unchanged and not stored.

    The sum is kept running (the state holds the sum of the gradients that
    stay in the window after the next push), so a step reads one slot and
    writes one whatever the window: its cost does not grow with ``window``.
    Rounding cannot drift: a second sum, of the gradients pushed since the
    ring last wrapped, replaces the running sum :math:`S` each time the ring
    is rewritten in full (every ``window`` finite steps), so :math:`S` never
    carries more than ``2 window`` roundings. Memory:
    ``window x params`` elements for the ring (halve it with
    ``accumulator_dtype=jnp.bfloat16``; the mean is then of the stored
    bfloat16 values) plus two float32 copies of the params for the sums.

    Args:
        window: Number of gradients averaged; a static int >= 1 (list it in
            ``static_args`` of ``optax.inject_hyperparams``).
        accumulator_dtype: dtype of the ring buffer; ``None`` keeps the param
            dtype.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
        ValueError: If ``window`` is not an int >= 1.
        ValueError: From ``update``, if the updates' tree or shapes differ from
            the state's or the params'.
        TypeError: From ``init``, if a leaf is not floating point, or is
            complex while ``accumulator_dtype`` is real.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax_stab
        >>> tx = optax_stab.moving_average(2)
        >>> state = tx.init(jnp.zeros(1))
        >>> for g in (1.0, 2.0, 6.0):
        ...     u, state = tx.update(jnp.array([g]), state)
        >>> print(u)
        [4.]
    """
    _validate.check_int("window", window, low=1)

    def init_fn(params):
        _validate.check_tree("moving_average", params, store_dtype=accumulator_dtype)

        def zeros(p):
            return jnp.zeros_like(p, dtype=_numerics.compute_dtype(p.dtype))

        return MovingAverageState(
            ring=_ring.init(params, window, accumulator_dtype),
            total=jax.tree.map(zeros, params),
            block=jax.tree.map(zeros, params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        _validate.check_tree("moving_average", updates, state.total, params=params)
        del params, extra_args
        finite = _tree.all_finite(updates)
        restart = state.ring.index == 0  # this push starts a pass over the ring
        complete = state.ring.index == window - 1  # ... and this one ends it
        count = jnp.minimum(state.ring.filled + 1, window).astype(jnp.float32)
        ring = _ring.push(state.ring, updates, where=finite)
        # The slot the *next* push overwrites, read from the updated ring: no
        # kernel reads the old ring besides the in-place write (a second
        # reader makes XLA copy the whole ring on every step).
        leaving = _ring.next_slot(ring)

        # The gradients as the ring stores them, in the sums' dtype.
        pushed = jax.tree.map(
            lambda g, buf, t: g.astype(buf.dtype).astype(t.dtype),
            updates,
            ring.values,
            state.total,
        )
        # Each old sum is read by one kernel only, the one that replaces it,
        # so XLA updates a donated state in place instead of copying it.
        block = jax.tree.map(
            lambda x, b: jnp.where(restart, x, b + x), pushed, state.block
        )
        block = optax.tree.where(finite, block, state.block)
        total = jax.tree.map(
            lambda x, t, b, out: jnp.where(complete, b, t + x) - out.astype(t.dtype),
            pushed,
            state.total,
            block,
            leaving,
        )
        total = optax.tree.where(finite, total, state.total)

        def mean(g, total, block, out_slot):
            # From the new sums: only their own kernels read the old ones, so
            # XLA updates a donated state in place (one rounding of the mean).
            full = jnp.where(complete, block, total + out_slot.astype(total.dtype))
            return (full / count.astype(full.dtype)).astype(g.dtype)

        means = jax.tree.map(mean, updates, total, block, leaving)
        new_state = MovingAverageState(ring=ring, total=total, block=block)
        return optax.tree.where(finite, means, updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gaussian_weights(window: int, sigma: Any) -> jax.Array:
    """Lag weights ``exp(-k**2 / (2 sigma**2))`` for ``k < window`` (unnormalised)."""
    k = jnp.arange(window, dtype=jnp.float32)
    s = _numerics.as_stat(sigma)
    return jnp.exp(-jnp.square(k) / (2 * jnp.square(s)))


def gaussian_smoothing(
    window: int = 8,
    sigma: jax.typing.ArrayLike | None = None,
    *,
    accumulator_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Causal Gaussian-window smoothing of gradients over time.

    Lag :math:`k < W` gets weight :math:`\exp(-k^2 / 2\sigma^2)`, normalised
    over the lags available (so during warm-up the weights of the
    :math:`n_t = \min(t, W)` gradients seen sum to one and step 1 returns the
    gradient itself). Memory: ``window x params`` elements. A step with any
    non-finite gradient is passed through unchanged and not stored.

    Args:
        window: Number of lags; a static int >= 1.
        sigma: Width in steps, > 0; ``None`` means ``window / 2``.
        accumulator_dtype: dtype of the ring buffer; ``None`` keeps the param
            dtype.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
        ValueError: If ``window`` is not an int >= 1 or ``sigma`` is outside (0, inf).
        ValueError: From ``update``, if the updates' tree or shapes differ from
            the state's or the params'.
        TypeError: From ``init``, if a leaf is not floating point, or is
            complex while ``accumulator_dtype`` is real.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax_stab
        >>> tx = optax_stab.gaussian_smoothing(2, sigma=1.0)
        >>> state = tx.init(jnp.zeros(1))
        >>> u, state = tx.update(jnp.array([0.0]), state)
        >>> u, state = tx.update(jnp.array([1.0]), state)
        >>> print(u)  # 1 / (1 + exp(-0.5))
        [0.62245935]
    """
    _validate.check_int("window", window, low=1)
    sigma = window / 2 if sigma is None else sigma
    _validate.check_interval("sigma", sigma, low=0.0)
    return _fir(
        "gaussian_smoothing",
        window,
        lambda: gaussian_weights(window, sigma),
        accumulator_dtype,
    )
