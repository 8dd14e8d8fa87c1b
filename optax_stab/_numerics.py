"""Small numeric helpers: dtypes, counters and tiny constants."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def resolve_dtype(dtype: Any | None) -> jnp.dtype:
    """Returns the statistic dtype: ``None`` means float32."""
    return jnp.dtype(jnp.float32 if dtype is None else dtype)


def zero_count() -> jax.Array:
    """A fresh int32 scalar counter."""
    return jnp.zeros([], jnp.int32)


def increment_if(pred: jax.Array, count: jax.Array) -> jax.Array:
    """Saturating increment of an int32 counter where ``pred`` holds."""
    return jnp.where(pred, optax.safe_increment(count), count)


def tiny(dtype: Any) -> jax.Array:
    """Smallest positive normal number of ``dtype``, as an array of that dtype."""
    return jnp.asarray(jnp.finfo(dtype).tiny, dtype)


def as_stat(value: Any, dtype: Any = jnp.float32) -> jax.Array:
    """Casts a (possibly traced, possibly low-precision) hyperparameter."""
    return jnp.asarray(value).astype(dtype)


ZSCORE_STD_FLOOR = 1e-3
"""Relative floor of the standard deviation in :func:`zscore`."""


def floored_std(mean: jax.Array, std: jax.Array) -> jax.Array:
    """``std`` floored at ``1e-3 * |mean|`` and at the dtype's tiny.

    The floor keeps a (nearly) constant history from turning rounding noise
    into huge z-scores: after a constant history ``c``, a value must exceed
    ``c * (1 + 1e-3 * z)`` to reach the z-score ``z``.
    """
    floor = jnp.maximum(ZSCORE_STD_FLOOR * jnp.abs(mean), tiny(std.dtype))
    return jnp.maximum(std, floor)


def zscore(x: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """``(x - mean) / floored_std(mean, std)``; NaN and Inf in ``x`` propagate."""
    return (x - mean) / floored_std(mean, std)


def ema(average: Any, value: Any, decay: Any) -> Any:
    """The one EMA step of the library: ``decay * average + (1 - decay) * value``.

    Used for every exponential moving average (gradients, second moments,
    norm statistics, skip fractions), so all have the same rounding.
    """
    return decay * average + (1 - decay) * value


def ema_mean_var(
    mean: jax.Array, var: jax.Array, value: jax.Array, decay: jax.Array
) -> tuple[jax.Array, jax.Array]:
    r"""Incremental EMA mean and variance of a scalar stream (West, 1979).

    With :math:`\delta = x - \mu`: :math:`\mu \leftarrow \mu + (1-\beta)\delta`
    and :math:`\sigma^2 \leftarrow \beta(\sigma^2 + (1-\beta)\delta^2)`, the
    exponentially weighted variance about the running mean.
    """
    delta = value - mean
    return mean + (1 - decay) * delta, decay * (var + (1 - decay) * jnp.square(delta))


def compute_dtype(dtype: Any) -> jnp.dtype:
    """float32, or ``dtype`` itself if it is a wider float (float64) or complex.

    The dtype to compute in for leaves of ``dtype`` (bfloat16 and float16
    leaves are computed in float32 and cast back; complex leaves stay complex),
    found without implicit promotion, so it works under
    ``jax.numpy_dtype_promotion("strict")``.
    """
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return dtype
    wide = jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize > 4
    return dtype if wide else jnp.dtype(jnp.float32)
