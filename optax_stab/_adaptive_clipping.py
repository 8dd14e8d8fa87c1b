"""History-adaptive norm clipping: AutoClip, ZClip and AdaGC.

Every clipper here learns its threshold from past gradients. A step whose
gradients hold a NaN or Inf passes through unchanged (so a guard downstream
sees it) and leaves every statistic untouched; its norm is still recorded in
``pre_clip_norm`` for logging.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_stab import _numerics, _ring, _tree, _validate

MODES = ("adaptive", "mean")


# ---------------------------------------------------------------------- AutoClip
class AutoclipState(NamedTuple):
    """State of :func:`autoclip`.

    Attributes:
        norms: :class:`optax_stab._ring.RingBuffer` of the last ``history``
            finite pre-clip global norms, float32 scalars.
        pre_clip_norm: Global norm of the last update before clipping; float32
            scalar.
        clipped_steps: Steps on which the update was scaled down; int32
            scalar, saturating.
    """

    norms: _ring.RingBuffer
    pre_clip_norm: jax.Array
    clipped_steps: jax.Array


def autoclip(
    percentile: jax.typing.ArrayLike = 10.0,
    *,
    history: int = 1000,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AutoClip: clips the global norm to a percentile of its own history.

    With :math:`n_t = \|g_t\|_2` and :math:`H_t` the last ``history`` finite
    norms including :math:`n_t`, the threshold is
    :math:`\eta_t = \mathrm{percentile}(H_t, p)` (linear interpolation, as
    ``numpy.percentile``) and the update is :math:`g_t \min(1, \eta_t / n_t)`,
    bit for bit :math:`g_t` when not clipped. The paper keeps every norm seen;
    here the history is a ring buffer of ``history`` float32 scalars, so
    memory is bounded. The first step is never clipped (its own norm is the
    whole history). A step with a NaN or Inf passes unchanged and is not
    added to the history.

    Args:
        percentile: The percentile :math:`p` in [0, 100]; the paper uses 10.
            100 never clips.
        history: Number of past norms kept; a static int >= 1.
        axis_name: A ``pmap`` / ``shard_map`` axis across which the updates
            are split; squared norms are summed over it.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
        ValueError: If ``percentile`` is outside [0, 100] or ``history`` is
            not an int >= 1.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax_stab
        >>> tx = optax_stab.autoclip(50.0, history=3)
        >>> state = tx.init(jnp.zeros(1))
        >>> for g in (1.0, 3.0, 2.0, 10.0):
        ...     u, state = tx.update(jnp.array([g]), state)
        >>> print(u)  # median of the last three norms (3, 2, 10)
        [3.]

    References:
        Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source
        Separation Networks <https://arxiv.org/abs/2007.14469>`_, 2020
    """
    _validate.check_interval(
        "percentile", percentile, low=0.0, high=100.0, low_closed=True, high_closed=True
    )
    _validate.check_int("history", history, low=1)

    def init_fn(params):
        _validate.check_tree("autoclip", params)
        return AutoclipState(
            _ring.init_scalar(history),
            jnp.zeros([], jnp.float32),
            _numerics.zero_count(),
        )

    def update_fn(updates, state, params=None, **extra_args):
        _validate.check_tree("autoclip", updates)
        del params, extra_args
        norm = _tree.global_norm(updates, axis_name=axis_name)
        finite = jnp.isfinite(norm)
        norms = _ring.push(state.norms, norm, where=finite)
        limit = _ring.masked_percentile(norms, _numerics.as_stat(percentile))
        updates, clipped = _tree.clip_to_norm(updates, norm, limit)
        count = _numerics.increment_if(clipped, state.clipped_steps)
        return updates, AutoclipState(norms, norm, count)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------------------- ZClip
class ZscoreClipState(NamedTuple):
    """State of :func:`zscore_clip`.

    Attributes:
        count: Finite steps seen; int32 scalar, saturating.
        norm_mean: During warm-up the mean of the norms seen so far, then
            their EMA; float32 scalar.
        norm_var: During warm-up the population variance of the norms seen so
            far, then their EMA variance; float32 scalar.
        pre_clip_norm: Global norm of the last update before clipping; float32
            scalar.
        clipped_steps: Steps on which the update was scaled down; int32
            scalar, saturating.
    """

    count: jax.Array
    norm_mean: jax.Array
    norm_var: jax.Array
    pre_clip_norm: jax.Array
    clipped_steps: jax.Array


def zscore_clip(
    *,
    decay: jax.typing.ArrayLike = 0.97,
    z_threshold: jax.typing.ArrayLike = 2.5,
    warmup_steps: jax.typing.ArrayLike = 25,
    mode: str = "adaptive",
    max_norm: jax.typing.ArrayLike | None = None,
    eps: jax.typing.ArrayLike = 1e-6,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""ZClip: clips global-norm spikes detected by a z-score on the norm's EMA.

    For the first ``warmup_steps`` finite steps the norms :math:`n_t` are only
    collected (and clipped at ``max_norm`` if given); then :math:`\mu` and
    :math:`\sigma^2` start as their mean and population variance. Afterwards,
    with :math:`z_t = (n_t - \mu) / (\sigma + \epsilon)`, a spike
    :math:`z_t > z_\mathrm{thr}` is clipped to

    .. math::
        n_t^* = \mu + \frac{z_\mathrm{thr}^2}{z_t}\,\sigma
        \;\;(\texttt{mode="adaptive"}), \qquad
        n_t^* = \mu \;\;(\texttt{mode="mean"}),

    otherwise :math:`n_t^* = n_t`; the update is scaled to
    :math:`\min(n_t^*, \mathrm{max\_norm})` when above it (bit for bit
    unchanged when not). The statistics then follow the z-clipped norm, as in
    the reference implementation (the ``max_norm`` cap does not enter them):

    .. math::
        \mu \leftarrow \beta\mu + (1-\beta)\,n_t^*, \qquad
        \sigma^2 \leftarrow \beta\sigma^2 + (1-\beta)(n_t^* - \mu)^2,

    the variance using the updated mean. Everything is computed on device:
    no host sync. A step with a NaN or Inf passes unchanged and leaves the
    statistics and ``count`` untouched.

    Args:
        decay: EMA decay :math:`\beta` in [0, 1) (the paper's :math:`\alpha`).
        z_threshold: Spike threshold :math:`z_\mathrm{thr}` > 0.
        warmup_steps: Finite steps collected before clipping starts, an
            integer >= 1 (traceable).
        mode: ``"adaptive"`` (reciprocal clipping, the paper's default) or
            ``"mean"``; static.
        max_norm: Optional hard cap on the norm, in (0, inf]; also applied during
            warm-up. ``None`` means no cap.
        eps: :math:`\epsilon` >= 0 in the z-score denominator.
        axis_name: A ``pmap`` / ``shard_map`` axis across which the updates
            are split; squared norms are summed over it.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
        ValueError: If a hyperparameter is out of range or ``mode`` unknown.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax_stab
        >>> tx = optax_stab.zscore_clip(warmup_steps=2, decay=0.9, eps=0.0)
        >>> state = tx.init(jnp.zeros(1))
        >>> for g in (1.0, 3.0, 12.0):  # warm-up: mu = 2, sigma = 1; z = 10
        ...     u, state = tx.update(jnp.array([g]), state)
        >>> print(u)  # 2 + 2.5**2 / 10 * 1
        [2.625]

    References:
        Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
        <https://arxiv.org/abs/2504.02507>`_, 2025
    """
    _validate.check_interval("decay", decay, low=0.0, high=1.0, low_closed=True)
    _validate.check_interval("z_threshold", z_threshold, low=0.0)
    _validate.check_count("warmup_steps", warmup_steps, low=1)
    _validate.check_choice("mode", mode, MODES)
    if max_norm is not None:
        _validate.check_interval("max_norm", max_norm, low=0.0, allow_inf=True)
    _validate.check_interval("eps", eps, low=0.0, low_closed=True)

    def init_fn(params):
        _validate.check_tree("zscore_clip", params)

        def zero():  # a fresh buffer per field, so the state can be donated
            return jnp.zeros([], jnp.float32)

        return ZscoreClipState(
            _numerics.zero_count(), zero(), zero(), zero(), _numerics.zero_count()
        )

    def update_fn(updates, state, params=None, **extra_args):
        _validate.check_tree("zscore_clip", updates)
        del params, extra_args
        beta, z_thr = _numerics.as_stat(decay), _numerics.as_stat(z_threshold)
        norm = _tree.global_norm(updates, axis_name=axis_name)
        finite = jnp.isfinite(norm)
        mean, var = state.norm_mean, state.norm_var
        warm = state.count < warmup_steps
        # Warm-up: running mean and population variance (Welford).
        n = optax.safe_increment(state.count).astype(jnp.float32)
        delta = norm - mean
        w_mean = mean + delta / n
        w_var = var + (delta * (norm - w_mean) - var) / n
        # After warm-up: z-score of the norm against the EMA statistics.
        std = jnp.sqrt(var)
        z = (norm - mean) / (std + _numerics.as_stat(eps))
        spike = ~warm & (z > z_thr)
        safe_z = jnp.where(spike, z, jnp.ones_like(z))
        target = mean if mode == "mean" else mean + jnp.square(z_thr) * std / safe_z
        z_clipped = jnp.where(spike, target, norm)
        limit = jnp.where(spike, target, jnp.inf)
        if max_norm is not None:
            limit = jnp.minimum(limit, _numerics.as_stat(max_norm))
        updates, clipped = _tree.clip_to_norm(updates, norm, limit)
        e_mean = _numerics.ema(mean, z_clipped, beta)
        e_var = beta * var + (1 - beta) * jnp.square(z_clipped - e_mean)
        new_mean = jnp.where(finite, jnp.where(warm, w_mean, e_mean), mean)
        new_var = jnp.where(finite, jnp.where(warm, w_var, e_var), var)
        return updates, ZscoreClipState(
            count=_numerics.increment_if(finite, state.count),
            norm_mean=new_mean,
            # Finite norms near float32's limit must not leave an Inf variance.
            norm_var=jnp.minimum(new_var, jnp.finfo(jnp.float32).max),
            pre_clip_norm=norm,
            clipped_steps=_numerics.increment_if(clipped, state.clipped_steps),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------------------- AdaGC
class AdaptiveTensorClipState(NamedTuple):
    """State of :func:`adaptive_tensor_clip`.

    Attributes:
        count: Finite steps seen; int32 scalar, saturating.
        clip_norm_ema: Per-leaf :math:`\\gamma`, the EMA of the leaf's past
            clipped norms (during warm-up their running minimum); a pytree of
            float32 scalars like the params.
        pre_clip_norm: Per-leaf norms of the last update before clipping; a
            pytree of float32 scalars like the params.
        clipped_steps: Steps on which some leaf was scaled down; int32
            scalar, saturating.
    """

    count: jax.Array
    clip_norm_ema: Any
    pre_clip_norm: Any
    clipped_steps: jax.Array


def adaptive_tensor_clip(
    *,
    decay: jax.typing.ArrayLike = 0.98,
    relative: jax.typing.ArrayLike = 1.05,
    warmup_steps: jax.typing.ArrayLike = 100,
    warmup_max_norm: jax.typing.ArrayLike = 1.0,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaGC: clips each leaf relative to the EMA of its own clipped norms.

    For the first ``warmup_steps`` finite steps the whole update is clipped
    by its global norm at ``warmup_max_norm`` (:math:`\lambda_\mathrm{abs}`),
    and each leaf's :math:`\gamma_i` tracks the running minimum of its clipped
    norm. Afterwards each leaf :math:`i` is clipped on its own:

    .. math::
        h_{t,i} = \min\Big(1, \frac{\lambda_\mathrm{rel}\,\gamma_{t-1,i}}
        {\|g_{t,i}\|}\Big), \quad \hat g_{t,i} = h_{t,i}\, g_{t,i}, \quad
        \gamma_{t,i} = \beta\gamma_{t-1,i} + (1-\beta)\,\|\hat g_{t,i}\|.

    Leaves that are not clipped pass bit for bit. Memory: two float32
    scalars per leaf. A step with a NaN or Inf passes unchanged and leaves
    :math:`\gamma` and ``count`` untouched.

    Args:
        decay: EMA decay :math:`\beta` in [0, 1).
        relative: :math:`\lambda_\mathrm{rel}` > 0, the allowed ratio of a
            leaf's norm to its EMA; the paper uses 1.05.
        warmup_steps: Steps of global clipping, an integer >= 1 (traceable).
        warmup_max_norm: :math:`\lambda_\mathrm{abs}` in [0, inf], the global
            clip norm during warm-up (``inf``: no warm-up clip).
        axis_name: A ``pmap`` / ``shard_map`` axis across which the updates
            are split; squared norms are summed over it.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
        ValueError: If a hyperparameter is out of range.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax_stab
        >>> tx = optax_stab.adaptive_tensor_clip(warmup_steps=1, decay=0.5)
        >>> g = {"a": jnp.array([0.6]), "b": jnp.array([0.8])}
        >>> u, state = tx.update(g, tx.init(g))  # warm-up: global norm 1
        >>> u, state = tx.update({"a": jnp.array([6.0]), "b": g["b"]}, state)
        >>> print(u["a"], u["b"])  # "a" clipped to 1.05 * 0.6, "b" untouched
        [0.63] [0.8]

    .. note:: A leaf whose gradient is exactly zero during warm-up gets
        :math:`\gamma = 0` and is clipped to zero afterwards, as in the paper;
        keep such leaves out with ``optax.masked``.

    References:
        Wang et al., `AdaGC: Improving Training Stability for Large Language
        Model Pretraining <https://arxiv.org/abs/2502.11034>`_, 2025
    """
    _validate.check_interval("decay", decay, low=0.0, high=1.0, low_closed=True)
    _validate.check_interval("relative", relative, low=0.0)
    _validate.check_count("warmup_steps", warmup_steps, low=1)
    _validate.check_interval(
        "warmup_max_norm", warmup_max_norm, low=0.0, low_closed=True, allow_inf=True
    )

    def init_fn(params):
        _validate.check_tree("adaptive_tensor_clip", params)

        def zeros():  # fresh buffers per field, so the state can be donated
            return jax.tree.map(lambda _: jnp.zeros([], jnp.float32), params)

        return AdaptiveTensorClipState(
            _numerics.zero_count(), zeros(), zeros(), _numerics.zero_count()
        )

    def update_fn(updates, state, params=None, **extra_args):
        _validate.check_tree(
            "adaptive_tensor_clip",
            updates,
            state.clip_norm_ema,
            shapes=False,
            params=params,
        )
        del params, extra_args
        beta, rel = _numerics.as_stat(decay), _numerics.as_stat(relative)
        norms = _tree.leaf_norms(updates, axis_name=axis_name)
        total = _tree.combine_norms(norms)
        finite = jnp.isfinite(total)
        warm = state.count < warmup_steps
        first = state.count == 0
        lam = _numerics.as_stat(warmup_max_norm)

        def leaf(u, n, gamma):
            limit = rel * gamma
            clip = finite & jnp.where(warm, total > lam, n > limit)
            # The scale is lam / total in warm-up, else limit / n; split so
            # that a huge finite norm never scales to (flushed) zero.
            den = jnp.where(clip, jnp.where(warm, total, n), jnp.ones_like(n))
            pre, scale = _tree.split_ratio(jnp.where(warm, lam, limit), den)
            out = _tree.scale_where(u, clip, scale, pre)
            new_norm = jnp.where(clip, n * pre * scale, n)
            ema = _numerics.ema(gamma, new_norm, beta)
            running_min = jnp.where(first, new_norm, jnp.minimum(gamma, new_norm))
            new_gamma = jnp.where(warm, running_min, ema)
            return out, jnp.where(finite, new_gamma, gamma), clip

        out, gamma, flags = _tree.map_unzip(
            leaf, updates, norms, state.clip_norm_ema, n=3
        )
        clipped = _tree.any_leaf(flags)
        return out, AdaptiveTensorClipState(
            count=_numerics.increment_if(finite, state.count),
            clip_norm_ema=gamma,
            pre_clip_norm=norms,
            clipped_steps=_numerics.increment_if(clipped, state.clipped_steps),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
