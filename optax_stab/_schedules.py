"""Learning-rate schedules for stable training that optax lacks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optax_stab import _numerics, _validate


def inverse_sqrt_decay(
    init_value: jax.typing.ArrayLike,
    alpha: jax.typing.ArrayLike,
    total_steps: jax.typing.ArrayLike,
) -> optax.Schedule:
    r"""Inverse-sqrt learning-rate decay :math:`\eta_0 / \sqrt{1 + \alpha t / T}`.

    At step :math:`t` (the optimizer's count, from 0) the value is
    :math:`\eta_0 / \sqrt{1 + \alpha\, t / T}`: :math:`\eta_0` at the start,
    :math:`\eta_0 / \sqrt{1 + \alpha}` at :math:`t = T`, and it keeps decaying
    (as :math:`1/\sqrt{t}`) after :math:`T`. For a linear decay
    :math:`\eta_0 (1 - t / T)` instead, use ``optax.linear_schedule(eta0, 0.0, T)``.

    Args:
        init_value: :math:`\eta_0`, a finite real.
        alpha: Decay strength :math:`\alpha` in [0, inf); 0 is a constant
            schedule.
        total_steps: The horizon :math:`T` in (0, inf).

    Returns:
        An ``optax.Schedule``: a function of the step count returning a
        float32 scalar (or ``init_value``'s wider float dtype).

    Raises:
        ValueError: If ``init_value`` is not finite, ``alpha`` is outside
            [0, inf) or ``total_steps`` outside (0, inf).

    Examples:
        >>> import optax
        >>> import optax_stab
        >>> schedule = optax_stab.inverse_sqrt_decay(0.1, alpha=3.0, total_steps=100)
        >>> print(schedule(0), schedule(100))  # 0.1 / sqrt(1 + 3)
        0.1 0.05
        >>> opt = optax.sgd(schedule)
    """
    inf = float("inf")
    _validate.check_interval("init_value", init_value, low=-inf, high=inf)
    _validate.check_interval("alpha", alpha, low=0.0, low_closed=True)
    _validate.check_interval("total_steps", total_steps, low=0.0)

    def schedule(count):
        eta0 = jnp.asarray(init_value)
        dtype = _numerics.compute_dtype(eta0.dtype)
        t = jnp.asarray(count).astype(dtype)
        a = jnp.asarray(alpha).astype(dtype)
        big_t = jnp.asarray(total_steps).astype(dtype)
        return eta0.astype(dtype) / jnp.sqrt(1 + a * t / big_t)

    return schedule
