"""Temporal gradient filters: the EMA and ``amplify_slow`` (Grokfast).

The windowed filters live in :mod:`optax_stab._fir` (moving average,
Gaussian, any FIR) and :mod:`optax_stab._median`.

All filters run over **time**, per coordinate: the output for a coordinate
depends only on that coordinate's past gradients. A step whose gradients hold
any NaN or Inf passes through unchanged (so a downstream guard sees it) and
leaves the filter state untouched, so one bad step never poisons the window.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_stab import _numerics, _tree, _validate


# --------------------------------------------------------------------------- EMA
class EmaSmoothingState(NamedTuple):
    """State of :func:`ema_smoothing`.

    Attributes:
        count: Finite steps seen; int32 scalar, saturating.
        ema: Biased EMA of the gradients; like the params, in
            ``accumulator_dtype`` if given.
        weight: Total weight the EMA gives the gradients seen, float32 scalar:
            :math:`w_t = \beta_t w_{t-1} + (1 - \beta_t)`, which is
            :math:`1 - \beta^t` for a constant decay; the debiasing divisor.
    """

    count: jax.Array
    ema: Any
    weight: jax.Array


def ema_smoothing(
    decay: jax.typing.ArrayLike = 0.9,
    *,
    debias: bool = True,
    accumulator_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Smooths gradients over time with an exponential moving average.

    .. math::
        m_t = \beta_t m_{t-1} + (1 - \beta_t) g_t, \quad
        w_t = \beta_t w_{t-1} + (1 - \beta_t), \quad
        u_t = m_t / w_t \;\text{(debiased)}.

    For a constant decay :math:`w_t = 1 - \beta^t`, the usual correction; the
    tracked :math:`w_t` stays exact when the decay is scheduled (for example
    0 for the first steps, to switch smoothing on later, through
    ``optax.inject_hyperparams``). With ``debias=True`` the first output is the
    gradient itself and the scale of the gradients is kept at every step. The
    EMA is computed in float32 and stored in ``accumulator_dtype``. A step with
    any non-finite gradient is passed through unchanged and does not enter the
    average. Memory: one copy of the params.

    Args:
        decay: EMA decay :math:`\beta`, in [0, 1); 0 is the identity.
        debias: Whether to divide by :math:`w_t`.
        accumulator_dtype: dtype of the stored EMA; ``None`` keeps the param
            dtype, ``jnp.bfloat16`` halves the memory of float32 params.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
        ValueError: If ``decay`` is outside [0, 1).
        ValueError: From ``update``, if the updates' tree or shapes differ from
            the state's or the params'.
        TypeError: From ``init``, if a leaf is not floating point, or is
            complex while ``accumulator_dtype`` is real.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax_stab
        >>> tx = optax_stab.ema_smoothing(0.5)
        >>> state = tx.init(jnp.zeros(2))
        >>> u, state = tx.update(jnp.array([1.0, 2.0]), state)
        >>> u, state = tx.update(jnp.array([3.0, 2.0]), state)
        >>> print(u)  # (0.25 * 1 + 0.5 * 3) / 0.75; a constant 2 stays 2
        [2.3333335 2.       ]

    .. seealso:: :func:`moving_average`, :func:`amplify_slow`.
    """
    _validate.check_interval("decay", decay, low=0.0, high=1.0, low_closed=True)

    def init_fn(params):
        _validate.check_tree("ema_smoothing", params, store_dtype=accumulator_dtype)
        ema = jax.tree.map(
            lambda p: jnp.zeros_like(p, dtype=accumulator_dtype or p.dtype), params
        )
        return EmaSmoothingState(
            count=_numerics.zero_count(), ema=ema, weight=jnp.zeros([], jnp.float32)
        )

    def update_fn(updates, state, params=None, **extra_args):
        _validate.check_tree("ema_smoothing", updates, state.ema, params=params)
        del params, extra_args
        beta = _numerics.as_stat(decay)
        finite = _tree.all_finite(updates)

        def average(m, g):
            # float32, or the leaf's wider or complex dtype (complex stays complex).
            ct = _numerics.compute_dtype(g.dtype)
            b = beta.astype(ct)
            return _numerics.ema(m.astype(ct), g.astype(ct), b)

        new = jax.tree.map(average, state.ema, updates)
        count = _numerics.increment_if(finite, state.count)
        weight = _numerics.ema(state.weight, 1.0, beta)
        bias = weight if debias else jnp.ones([], jnp.float32)
        ema = optax.tree.where(finite, optax.tree.cast_like(new, state.ema), state.ema)

        def out(m, stored, g):
            # From the stored EMA when it holds the float32 value exactly: then
            # only the state's kernel reads the old EMA, and XLA can update a
            # donated state in place instead of copying it first.
            src = stored if stored.dtype == m.dtype else m
            return (src / bias.astype(m.dtype)).astype(g.dtype)

        smoothed = jax.tree.map(out, new, ema, updates)
        weight = jnp.where(finite, weight, state.weight)
        return optax.tree.where(finite, smoothed, updates), EmaSmoothingState(
            count, ema, weight
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------- amplify_slow
class AmplifySlowState(NamedTuple):
    """State of :func:`amplify_slow`.

    Attributes:
        filter_state: State of the wrapped smoothing filter.
    """

    filter_state: Any


def amplify_slow(
    strength: jax.typing.ArrayLike = 2.0,
    filter: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Grokfast: adds the amplified slow component of the gradients.

    :math:`u_t = g_t + \lambda\, S(g)_t`, with :math:`S` any smoothing filter
    of this module (default ``ema_smoothing(0.98)``, the Grokfast-EMA filter;
    ``moving_average(w)`` gives Grokfast-MA). A non-finite gradient passes
    through (the filter skips it).

    Args:
        strength: Amplification :math:`\lambda`, >= 0; 0 is the identity.
        filter: A smoothing transform; ``None`` means ``ema_smoothing(0.98)``.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
        ValueError: If ``strength`` is negative, infinite or NaN.
        TypeError: If ``filter`` is not a gradient transformation.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax_stab
        >>> tx = optax_stab.amplify_slow(2.0)
        >>> u, _ = tx.update(jnp.array([1.0]), tx.init(jnp.zeros(1)))
        >>> print(u)  # g + 2 * ema(g) = 1 + 2 * 1 on the first step
        [3.]

    References:
        Lee et al., `Grokfast: Accelerated Grokking by Amplifying Slow
        Gradients <https://arxiv.org/abs/2405.20233>`_, 2024
    """
    _validate.check_interval("strength", strength, low=0.0, low_closed=True)
    if filter is not None:
        _validate.check_transform("filter", filter)
    inner = optax.with_extra_args_support(
        ema_smoothing(0.98) if filter is None else filter
    )

    def init_fn(params):
        _validate.check_tree("amplify_slow", params)
        return AmplifySlowState(inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        slow, filter_state = inner.update(
            updates, state.filter_state, params, **extra_args
        )

        def amplify(g, s):
            ct = _numerics.compute_dtype(g.dtype)
            lam = _numerics.as_stat(strength, ct)
            return (g.astype(ct) + lam * s.astype(ct)).astype(g.dtype)

        out = jax.tree.map(amplify, updates, slow)
        return out, AmplifySlowState(filter_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
