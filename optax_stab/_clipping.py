"""Gradient clipping by a fixed norm (global or per leaf) and SPAM spike clipping.

The history-adaptive norm clippers (AutoClip, ZClip, AdaGC) live in
:mod:`optax_stab._adaptive_clipping`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_stab import _numerics, _tree, _validate

SCOPES = ("global", "leaf")


class ClipByNormState(NamedTuple):
    """State of :func:`clip_by_norm`.

    Attributes:
        pre_clip_norm: The norm of the last update before clipping, float32:
            a scalar for ``scope="global"``, a pytree of scalars like the
            params for ``scope="leaf"``. Inf or NaN after a non-finite step,
            overwritten by the next one.
        clipped_steps: Steps on which some update was scaled down; int32
            scalar, saturating.
    """

    pre_clip_norm: Any
    clipped_steps: jax.Array


def clip_by_norm(
    max_norm: jax.typing.ArrayLike,
    *,
    scope: str = "global",
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Scales updates down to ``max_norm`` when their L2 norm is above it.

    With :math:`n = \|g\|_2`, the update is :math:`g \cdot \mathrm{max\_norm} / n`
    if :math:`n > \mathrm{max\_norm}` and :math:`g` itself, bit for bit,
    otherwise. ``scope="global"`` uses the norm of the whole pytree (as
    :func:`optax.clip_by_global_norm`), ``scope="leaf"`` clips each leaf by its
    own norm. Norms are accumulated in float32 whatever the gradient dtype (so
    bfloat16 gradients are clipped by their true norm). ``max_norm = 0`` maps
    any update to zeros and all-zero updates to zeros (never 0/0).

    Norms are overflow-safe: a finite gradient (``1e30``, or ``1e-30``) gets
    its true norm to float32 rounding and is clipped to ``max_norm``; complex
    leaves count :math:`|z|^2` and stay complex. A non-finite norm (a NaN or
    Inf in the tree, or in the leaf for ``scope="leaf"``, or a norm beyond
    float32's max of about ``3.4e38``) is never used to scale: that update
    passes unchanged, ``pre_clip_norm`` records the Inf or NaN, and a guard
    acts on it (:func:`optax_stab.guard_nonfinite`,
    :func:`optax_stab.spike_guard`).

    Args:
        max_norm: Largest allowed norm, in [0, inf]; ``inf`` never clips.
        scope: ``"global"`` (one norm for the pytree) or ``"leaf"`` (one per
            leaf); static.
        axis_name: A ``pmap`` or ``shard_map`` axis over which the updates are
            split: squared norms are summed across it, so every device clips by
            the norm of the full gradient.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs` whose state
        :class:`ClipByNormState` keeps the pre-clip norm for logging.

    Raises:
        ValueError: If ``max_norm`` is negative or NaN, or ``scope`` is unknown;
            from ``update``, if the updates' tree differs from the state's.
        TypeError: From ``init`` or ``update``, if a leaf is not floating point.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax_stab
        >>> tx = optax_stab.clip_by_norm(1.0)
        >>> g = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}
        >>> u, state = tx.update(g, tx.init(g))
        >>> print(u["a"], u["b"], state.pre_clip_norm)
        [0.6 0. ] [0.8] 5.0

        Value clipping :math:`\mathrm{clip}(g, -\epsilon, \epsilon)` is
        ``optax.clip(eps)`` and AGC is ``optax.adaptive_grad_clip``; both
        chain with this one:

        >>> import optax
        >>> tx = optax.chain(optax.clip(2.0), optax_stab.clip_by_norm(1.0))
        >>> u, _ = tx.update(g, tx.init(g))
        >>> print(u["a"], u["b"])  # (2, 0, 2) / sqrt(8)
        [0.70710677 0.        ] [0.70710677]

    .. seealso:: :func:`optax_stab.autoclip`, :func:`optax_stab.zscore_clip`,
        :func:`optax_stab.adaptive_tensor_clip`.
    """
    _validate.check_interval(
        "max_norm", max_norm, low=0.0, low_closed=True, allow_inf=True
    )
    _validate.check_choice("scope", scope, SCOPES)

    def init_fn(params):
        _validate.check_tree("clip_by_norm", params)
        if scope == "global":
            norm = jnp.zeros([], jnp.float32)
        else:
            norm = jax.tree.map(lambda _: jnp.zeros([], jnp.float32), params)
        return ClipByNormState(norm, _numerics.zero_count())

    def update_fn(updates, state, params=None, **extra_args):
        # Per leaf: the state and the params fix the tree. Global: any tree.
        leafwise = scope == "leaf"
        _validate.check_tree(
            "clip_by_norm",
            updates,
            state.pre_clip_norm if leafwise else None,
            shapes=False,
            params=params if leafwise else None,
        )
        del params, extra_args
        limit = _numerics.as_stat(max_norm)
        if scope == "global":
            norm = _tree.global_norm(updates, axis_name=axis_name)
            updates, clipped = _tree.clip_to_norm(updates, norm, limit)
        else:
            norm = _tree.leaf_norms(updates, axis_name=axis_name)
            updates, flags = _tree.map_unzip(
                lambda u, n: _tree.clip_to_norm(u, n, limit), updates, norm, n=2
            )
            clipped = _tree.any_leaf(flags)
        count = _numerics.increment_if(clipped, state.clipped_steps)
        return updates, ClipByNormState(norm, count)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# -------------------------------------------------------------------------- SPAM
class SpikeClipState(NamedTuple):
    """State of :func:`spike_clip`.

    Attributes:
        count: Finite steps seen; int32 scalar, saturating.
        nu: EMA of the squared (clipped) gradients, each clamped at the
            ceiling in "Range" (so always finite), like the params, float32
            unless ``nu_dtype`` is given.
        clipped_steps: Steps on which some coordinate was clipped; int32
            scalar, saturating.
    """

    count: jax.Array
    nu: Any
    clipped_steps: jax.Array


def spike_clip(
    threshold: jax.typing.ArrayLike = 5000.0,
    *,
    decay: jax.typing.ArrayLike = 0.999,
    warmup_steps: jax.typing.ArrayLike = 20,
    nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SPAM's spike-aware clipping, per coordinate, against an EMA of :math:`g^2`.

    With :math:`\nu_{t-1}` the (not debiased) EMA of past squared clipped
    gradients and :math:`\theta` the threshold, each coordinate becomes

    .. math::
        \hat g_t = \begin{cases}
        \mathrm{sign}(g_t)\sqrt{\theta\,\nu_{t-1}} & g_t^2 > \theta\,\nu_{t-1} \\
        g_t & \text{otherwise}
        \end{cases}, \qquad
        \nu_t = \beta\nu_{t-1} + (1-\beta)\,\hat g_t^2 .

    Clipping is off for the first ``warmup_steps`` finite steps (while
    :math:`\nu` builds up) and for coordinates whose :math:`\nu` is still
    exactly 0 (never saw a nonzero gradient), which would otherwise be frozen
    at zero for ever. Unclipped coordinates pass bit for bit.

    **Range.** A squared gradient enters :math:`\nu` clamped at
    :math:`M = \mathrm{finfo}(\nu).\mathrm{max} / (2\max(\theta, 1))`, so
    :math:`\theta\nu` stays finite: a finite gradient too large to square in
    float32 (beyond about ``1.8e19``), even during warm-up, leaves a finite
    :math:`\nu` and its coordinate is clipped again later (to at most
    :math:`\sqrt{\theta M}`, about ``1.3e19`` in float32) instead of being
    frozen at an Inf :math:`\nu`. Below :math:`M` the EMA is exact. Memory: one
    float32 copy of the params (``nu_dtype`` can change it; a bfloat16
    :math:`\nu` cannot resolve ``decay=0.999`` updates). A step with a NaN or
    Inf passes unchanged and leaves :math:`\nu` and ``count`` untouched.
    The clip reads the old :math:`\nu` while the new one is written: with
    donated state on CPU, compile the step with
    ``compiler_options={"xla_cpu_copy_insertion_use_region_analysis": True}``
    or XLA:CPU copies :math:`\nu` every step (``docs/benchmarks.md``,
    "Copies").

    Args:
        threshold: :math:`\theta` > 0; SPAM uses 5000 against Adam's
            :math:`\nu`.
        decay: EMA decay :math:`\beta` in [0, 1), SPAM's :math:`\beta_2`.
        warmup_steps: Finite steps before clipping starts, an integer >= 0
            (traceable).
        nu_dtype: dtype of :math:`\nu`; ``None`` means float32.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
        ValueError: If a hyperparameter is out of range; from ``update``, if
            the updates' tree or shapes differ from the state's.
        TypeError: From ``init`` or ``update``, if a leaf is complex (the clip
            needs ``sign``) or not floating point.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax_stab
        >>> tx = optax_stab.spike_clip(4.0, decay=0.5, warmup_steps=1)
        >>> state = tx.init(jnp.zeros(2))
        >>> u, state = tx.update(jnp.array([2.0, -2.0]), state)  # nu = 2
        >>> u, state = tx.update(jnp.array([1.0, -100.0]), state)
        >>> print(u)  # 100**2 > 4 * 2: clipped to -sqrt(8)
        [ 1.       -2.828427]

    References:
        Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable
        LLM Training <https://arxiv.org/abs/2501.06842>`_, 2025
    """
    _validate.check_interval("threshold", threshold, low=0.0)
    _validate.check_interval("decay", decay, low=0.0, high=1.0, low_closed=True)
    _validate.check_count("warmup_steps", warmup_steps, low=0)
    dtype = _numerics.resolve_dtype(nu_dtype)

    def _nu_ceiling(nu, x):
        # finfo(nu).max / (2 max(theta, 1)): theta * nu and its EMA rounding
        # stay below the max of nu's dtype and of x's.
        big = min(float(jnp.finfo(nu.dtype).max), float(jnp.finfo(x.dtype).max))
        theta = jnp.maximum(_numerics.as_stat(threshold, x.dtype), 1)
        return jnp.asarray(big / 2, x.dtype) / theta

    def init_fn(params):
        _validate.check_tree("spike_clip", params, ordered=True)
        nu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=dtype), params)
        return SpikeClipState(_numerics.zero_count(), nu, _numerics.zero_count())

    def update_fn(updates, state, params=None, **extra_args):
        _validate.check_tree(
            "spike_clip", updates, state.nu, ordered=True, params=params
        )
        del params, extra_args
        active = state.count >= warmup_steps

        def spikes(g, nu):
            ct = _numerics.compute_dtype(g.dtype)
            theta = _numerics.as_stat(threshold, ct)
            x, v = g.astype(ct), nu.astype(ct)
            cap2 = theta * v
            return x, v, cap2, active & (v > 0) & (jnp.square(x) > cap2)

        def score(g, nu):
            # 1 where a coordinate is clipped, else 0; NaN where g is not
            # finite: one sum answers both tree-wide questions.
            x, _, _, spike = spikes(g, nu)
            return _tree.nonfinite_marker(x) + spike.astype(x.dtype)

        # The number of clipped coordinates, NaN after a non-finite gradient.
        top = _tree.materialised(_tree.total(updates, score, state.nu))
        finite = jnp.isfinite(top)

        def leaf(g, nu):
            x, v, cap2, spike = spikes(g, nu)
            beta = _numerics.as_stat(decay, x.dtype)
            capped = jnp.sign(x) * _tree.safe_sqrt(cap2)
            out = jnp.where(spike, capped.astype(g.dtype), g)
            # capped**2 is cap2: the sqrt stays in one kernel (``out``'s).
            # Clamped, so theta * nu stays finite ("Range" in the docstring).
            sq = jnp.minimum(jnp.where(spike, cap2, jnp.square(x)), _nu_ceiling(nu, x))
            ema = _numerics.ema(v, sq, beta)
            return out, jnp.where(finite, ema, v).astype(nu.dtype)

        out, nu = _tree.map_unzip(leaf, updates, state.nu, n=2)
        return optax.tree.where(finite, out, updates), SpikeClipState(
            count=_numerics.increment_if(finite, state.count),
            nu=nu,
            clipped_steps=_numerics.increment_if(
                finite & (top > 0), state.clipped_steps
            ),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
