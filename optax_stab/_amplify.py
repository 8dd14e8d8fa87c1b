"""Threshold amplification: sign-power maps lift small gradients, damp large ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optax_stab import _numerics, _validate


def _safe_power(x: jax.Array, p: jax.Array) -> jax.Array:
    # x**p for x >= 0 with value 0 at x = 0 (also for p = 0) and derivative 0
    # there: the true derivative of x**p (p < 1) is infinite at 0, and
    # d/dp x**p = x**p log x is NaN at 0. Evaluating the power at 1 where
    # x = 0 keeps both finite inside jax.grad.
    zero = x == 0
    return jnp.where(zero, jnp.zeros_like(x), jnp.where(zero, 1, x) ** p)


def sign_power(
    power: jax.typing.ArrayLike = 0.5, threshold: jax.typing.ArrayLike = 1.0
) -> optax.GradientTransformationExtraArgs:
    r"""Amplifies gradient elements below a threshold and shrinks those above it.

    .. math::
        u = \mathrm{sign}(g)\,\gamma\,(|g| / \gamma)^p .

    With :math:`0 \le p < 1` magnitudes below the threshold :math:`\gamma` are
    amplified, magnitudes above it are shrunk, and :math:`|g| = \gamma` is a
    fixed point, so no coordinate's step dies out or runs away. :math:`p = 0`
    is sign descent scaled by :math:`\gamma`, :math:`p = 1/2` is
    :func:`sign_sqrt_amplification` and :math:`p = 1` the identity. The map is
    odd and monotone. It is exactly 0 at :math:`g = 0`, and its derivative
    there (with respect to :math:`g`, :math:`p` and :math:`\gamma`) is 0 rather
    than Inf or NaN, so it is safe inside ``jax.grad`` for meta-gradients.
    It is computed in float32 (or wider) and cast back to the gradient dtype;
    a NaN or Inf element passes through unchanged. Stateless.

    Args:
        power: The exponent :math:`p` in [0, 1].
        threshold: The fixed magnitude :math:`\gamma` > 0.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs` with an empty state.

    Raises:
        ValueError: If ``power`` is outside [0, 1] or ``threshold`` outside
            (0, inf).
        TypeError: From ``init`` or ``update``, if a leaf is complex (the map
            needs the sign of a real number) or not floating point.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax_stab
        >>> tx = optax_stab.sign_power(0.5, threshold=4.0)
        >>> u, _ = tx.update(jnp.array([-1.0, 0.0, 4.0, 16.0]), tx.init(None))
        >>> print(u)  # sign(g) * 4 * sqrt(|g| / 4)
        [-2.  0.  4.  8.]

    .. seealso:: :func:`sign_sqrt_amplification`.
    """
    return _sign_power("sign_power", power, threshold)


def sign_sqrt_amplification(
    threshold: jax.typing.ArrayLike = 1.0,
) -> optax.GradientTransformationExtraArgs:
    r"""Sign-sqrt threshold amplification :math:`\mathrm{sign}(g)\sqrt{\gamma |g|}`.

    Element-wise, magnitudes below :math:`\gamma` are amplified and magnitudes
    above it shrunk (:math:`|g| = \gamma` is fixed), so vanishing gradients in
    early layers are lifted and exploding ones damped; it halves the spread of
    log-magnitudes. Equal to ``sign_power(0.5, threshold)``: exactly 0 at 0
    with a finite derivative there; NaN and Inf pass unchanged. Stateless.

    Args:
        threshold: The fixed magnitude :math:`\gamma` > 0.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs` with an empty state.

    Raises:
        ValueError: If ``threshold`` is outside (0, inf).
        TypeError: As :func:`sign_power`.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax
        >>> import optax_stab
        >>> tx = optax.chain(optax_stab.sign_sqrt_amplification(1.0), optax.sgd(0.1))
        >>> u, _ = tx.update(jnp.array([0.01, -4.0]), tx.init(jnp.zeros(2)))
        >>> print(u)  # -0.1 * sign(g) * sqrt(|g|)
        [-0.01  0.2 ]

        To compare it with gradient accumulation, use
        ``optax.MultiSteps(tx, every_k_schedule=k)``, which chains with it.

    .. seealso:: :func:`sign_power`.
    """
    return _sign_power("sign_sqrt_amplification", 0.5, threshold)


def _sign_power(
    name: str, power: jax.typing.ArrayLike, threshold: jax.typing.ArrayLike
) -> optax.GradientTransformationExtraArgs:
    _validate.check_interval(
        "power", power, low=0.0, high=1.0, low_closed=True, high_closed=True
    )
    _validate.check_interval("threshold", threshold, low=0.0)

    def init_fn(params):
        _validate.check_tree(name, params, ordered=True)
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        _validate.check_tree(name, updates, ordered=True)
        del params, extra_args

        def one(g):
            ct = _numerics.compute_dtype(g.dtype)
            p, gamma = _numerics.as_stat(power, ct), _numerics.as_stat(threshold, ct)
            x = g.astype(ct)
            u = jnp.sign(x) * gamma * _safe_power(jnp.abs(x) / gamma, p)
            return jnp.where(jnp.isfinite(g), u.astype(g.dtype), g)

        return jax.tree.map(one, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
