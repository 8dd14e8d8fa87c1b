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


def debias(decay: jax.Array, count: jax.Array) -> jax.Array:
    """Bias correction ``1 - decay**count`` in ``decay``'s dtype; 1 at count 0."""
    c = count.astype(decay.dtype)
    return jnp.where(count > 0, 1 - decay**c, jnp.ones_like(decay))
