"""Weight constraints: weight clipping as a projection, and the L1 penalty."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optax_stab import _numerics, _validate


def clip_weights(
    max_abs: jax.typing.ArrayLike,
) -> optax.GradientTransformationExtraArgs:
    r"""Weight clipping: turns the update into one that keeps weights in a box.

    Given the incoming update :math:`u` and the params :math:`w`, returns
    :math:`u' = \mathrm{clip}(w + u, -\epsilon, \epsilon) - w`, so that
    ``optax.apply_updates(params, u')`` is the projection of ``w + u`` onto
    :math:`[-\epsilon, \epsilon]`. Put it last in the chain (after the
    optimizer, which produces the step :math:`u`). Weights already outside the
    box are moved onto it. Computed in float32 (or wider), so that with
    float32 params and updates ``w + u'`` never rounds past the bound; with
    bfloat16 params or updates the result is then rounded to their dtype
    (by at most one bfloat16 ulp past the bound). An update element that is NaN or Inf
    passes unchanged. Stateless.

    Args:
        max_abs: The bound :math:`\epsilon` > 0.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs` with an empty state;
        its ``update`` needs ``params``.

    Raises:
        ValueError: If ``max_abs`` is outside (0, inf), or (from ``update``) if
            ``params`` is not given or its tree differs from the updates'.
        TypeError: If a leaf is complex (the box needs an ordering) or not
            floating point.

    Examples:
        The seed's weight clipping with (sign-corrected) weight regularisation,
        :math:`w \leftarrow \mathrm{clip}(w - \eta g - \eta\lambda w,
        -\epsilon, \epsilon)`:

        >>> import jax.numpy as jnp
        >>> import optax
        >>> import optax_stab
        >>> eta, lam, eps = 0.1, 0.5, 1.0
        >>> tx = optax.chain(
        ...     optax.add_decayed_weights(lam), optax.sgd(eta),
        ...     optax_stab.clip_weights(eps))
        >>> w = jnp.array([0.9, -0.5])
        >>> u, _ = tx.update(jnp.array([-3.0, 1.0]), tx.init(w), w)
        >>> print(optax.apply_updates(w, u))  # clip(0.9 + 0.3 - 0.045); -0.5 - 0.075
        [ 1.    -0.575]
    """
    _validate.check_interval("max_abs", max_abs, low=0.0)

    def init_fn(params):
        _validate.check_tree("clip_weights", params, ordered=True)
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _validate.require_params(params)
        _validate.check_tree("clip_weights", params, ordered=True)
        _validate.check_tree("clip_weights", updates, params, ordered=True)

        def one(u, w):
            ct = max(
                _numerics.compute_dtype(u.dtype),
                _numerics.compute_dtype(w.dtype),
                key=lambda d: d.itemsize,
            )
            m = _numerics.as_stat(max_abs, ct)
            w = w.astype(ct)
            d = jnp.clip(w + u.astype(ct), -m, m) - w
            # w + d can round one ulp past the box when |d| > |w + d|; step d
            # one ulp inwards until it does not (twice is always enough).
            for _ in range(2):
                r = w + d
                d = jnp.where(r > m, jnp.nextafter(d, -jnp.inf), d)
                d = jnp.where(r < -m, jnp.nextafter(d, jnp.inf), d)
            return jnp.where(jnp.isfinite(u), d.astype(u.dtype), u)

        return jax.tree.map(one, updates, params), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def add_l1_penalty(
    strength: jax.typing.ArrayLike,
) -> optax.GradientTransformationExtraArgs:
    r"""Adds the (sub)gradient of an L1 penalty: :math:`g + \lambda\,\mathrm{sign}(w)`.

    The gradient of :math:`\lambda \|w\|_1` added to the loss, with
    :math:`\mathrm{sign}(0) = 0`. Put it before the optimizer, as
    ``optax.add_decayed_weights`` (the L2 / decoupled weight decay) is used.
    Computed in float32 (or wider) and cast to the update dtype. Stateless.

    Args:
        strength: :math:`\lambda` >= 0; 0 is the identity.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs` with an empty state;
        its ``update`` needs ``params``.

    Raises:
        ValueError: If ``strength`` is outside [0, inf), or (from ``update``)
            if ``params`` is not given or its tree differs from the updates'.
        TypeError: If a param is complex (``sign`` needs a real number) or a
            leaf is not floating point.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax
        >>> import optax_stab
        >>> tx = optax_stab.add_l1_penalty(0.1)
        >>> w = jnp.array([2.0, 0.0, -3.0])
        >>> u, _ = tx.update(jnp.ones(3), tx.init(w), w)
        >>> print(u)  # g + 0.1 * sign(w)
        [1.1 1.  0.9]

        In a chain it goes before the optimizer, like L2 weight decay:

        >>> opt = optax.chain(optax_stab.add_l1_penalty(1e-4), optax.sgd(0.1))
    """
    _validate.check_interval("strength", strength, low=0.0, low_closed=True)

    def init_fn(params):
        _validate.check_tree("add_l1_penalty", params, ordered=True)
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _validate.require_params(params)
        _validate.check_tree("add_l1_penalty", params, ordered=True)
        _validate.check_tree("add_l1_penalty", updates, params)

        def one(g, w):
            ct = _numerics.compute_dtype(g.dtype)
            lam = _numerics.as_stat(strength, ct)
            return (g.astype(ct) + lam * jnp.sign(w).astype(ct)).astype(g.dtype)

        return jax.tree.map(one, updates, params), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
