"""Guards: wrappers that skip, rescale or reset a step on non-finite values or spikes.

A guard wraps an inner transformation and decides, per step and without any
host sync, whether the inner update is applied. A skipped step returns a zero
update and leaves the inner state bit for bit as it was; every decision is
counted in the guard's state, so no step is ever lost silently.

**Passing the loss.** Guards read the loss from the ``loss=`` extra argument
(both guards return :class:`optax.GradientTransformationExtraArgs`, so
``optax.chain`` forwards it). When ``loss`` is not passed, the loss is simply
not watched. The three ways a Flax user passes it:

* any optax loop: ``tx.update(grads, opt_state, params, loss=loss)``;
* Flax NNX: ``optimizer.update(model, grads, loss=loss)`` (``nnx.Optimizer``
  forwards keyword arguments to ``tx.update``);
* Flax linen ``TrainState``, whose ``apply_gradients`` forwards no extra
  arguments to ``tx.update``: call the transformation yourself::

      updates, opt_state = state.tx.update(
          grads, state.opt_state, state.params, loss=loss
      )
      state = state.replace(
          step=state.step + 1,
          params=optax.apply_updates(state.params, updates),
          opt_state=opt_state,
      )
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_stab import _numerics, _ring, _tree, _validate

_ACTIONS = ("skip", "rescale", "reset")
_WATCH = ("both", "loss", "grad_norm")


def _loss_of(extra_args: dict[str, Any]) -> jax.Array | None:
    """The ``loss=`` extra argument as a float32 scalar, or None if absent."""
    loss = extra_args.get("loss")
    if loss is None:
        return None
    loss = jnp.asarray(loss)
    if loss.ndim != 0:
        raise ValueError(
            f"`loss` passed to a guard must be a scalar, got shape {loss.shape}."
        )
    return loss.astype(jnp.float32)


def _zero_where(pred: jax.Array, updates: Any) -> Any:
    """Zero update (in each leaf's dtype) where ``pred`` holds."""
    return jax.tree.map(lambda u: jnp.where(pred, jnp.zeros_like(u), u), updates)


# ---------------------------------------------------------------- nonfinite
class GuardNonfiniteState(NamedTuple):
    """State of :func:`guard_nonfinite`.

    Attributes:
        inner_state: State of the wrapped transformation.
        nonfinite_steps: Steps with a NaN or Inf in the gradients or the loss,
            skipped or not; int32 scalar, saturating.
        consecutive_nonfinite: Non-finite steps in a row up to now; 0 after a
            finite step; int32 scalar, saturating.
        applied_nonfinite_steps: Non-finite steps applied anyway because more
            than ``max_consecutive`` came in a row; int32 scalar, saturating.
    """

    inner_state: Any
    nonfinite_steps: jax.Array
    consecutive_nonfinite: jax.Array
    applied_nonfinite_steps: jax.Array


def guard_nonfinite(
    inner: optax.GradientTransformation,
    *,
    max_consecutive: jax.typing.ArrayLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Skips every step whose gradients or loss hold a NaN or an Inf.

    A step is bad when any gradient leaf holds NaN, +Inf or -Inf, or when the
    ``loss=`` extra argument is given and is not finite. A bad step returns a
    zero update (in the gradients' dtype) and leaves ``inner_state`` bit for
    bit unchanged; it is counted in ``nonfinite_steps`` and
    ``consecutive_nonfinite``. After more than ``max_consecutive`` bad steps
    in a row, bad steps are passed to ``inner`` anyway (the inner
    transformation decides what to do with them) and counted in
    ``applied_nonfinite_steps``, until a finite step resets the run.

    Unlike ``optax.apply_if_finite``, the loss is checked too and the
    consecutive counter is reset by the first good step. The inner update is
    always computed and selected arithmetically (no ``lax.cond``), so the
    guard costs one select over the inner state. Extra arguments (``loss=``
    and others) are forwarded to ``inner``.

    Args:
        inner: The transformation to guard.
        max_consecutive: Number of bad steps in a row that are skipped, an
            integer >= 0 (0 applies every step but still counts them);
            ``None`` skips every bad step.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs` whose state is a
        :class:`GuardNonfiniteState`.

    Raises:
        ValueError: If ``max_consecutive`` is not an integer >= 0.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax
        >>> import optax_stab
        >>> tx = optax_stab.guard_nonfinite(optax.adam(0.1))
        >>> state = tx.init(jnp.zeros(2))
        >>> u, state = tx.update(jnp.array([1.0, jnp.nan]), state)
        >>> print(u, int(state.nonfinite_steps), int(state.inner_state[0].count))
        [0. 0.] 1 0
        >>> u, state = tx.update(jnp.array([1.0, -1.0]), state, loss=jnp.inf)
        >>> print(u, int(state.consecutive_nonfinite))
        [0. 0.] 2
        >>> u, state = tx.update(jnp.array([1.0, -1.0]), state, loss=0.5)
        >>> print(u.round(3), int(state.consecutive_nonfinite))  # Adam's first step
        [-0.1  0.1] 0

    .. seealso:: :func:`spike_guard`, ``optax.apply_if_finite``.
    """
    if max_consecutive is not None:
        _validate.check_count("max_consecutive", max_consecutive, low=0)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return GuardNonfiniteState(
            inner_state=inner.init(params),
            nonfinite_steps=_numerics.zero_count(),
            consecutive_nonfinite=_numerics.zero_count(),
            applied_nonfinite_steps=_numerics.zero_count(),
        )

    def update_fn(updates, state, params=None, **extra_args):
        loss = _loss_of(extra_args)
        bad = ~_tree.all_finite(updates)
        if loss is not None:
            bad = bad | ~jnp.isfinite(loss)
        consecutive = jnp.where(
            bad,
            optax.safe_increment(state.consecutive_nonfinite),
            jnp.zeros_like(state.consecutive_nonfinite),
        )
        if max_consecutive is None:
            forced = jnp.zeros([], bool)
        else:
            limit = _numerics.as_stat(max_consecutive)
            forced = bad & (consecutive.astype(jnp.float32) > limit)
        skip = bad & ~forced
        out, inner_state = inner.update(
            updates, state.inner_state, params, **extra_args
        )
        return _zero_where(skip, out), GuardNonfiniteState(
            inner_state=_tree.select(skip, state.inner_state, inner_state),
            nonfinite_steps=_numerics.increment_if(bad, state.nonfinite_steps),
            consecutive_nonfinite=consecutive,
            applied_nonfinite_steps=_numerics.increment_if(
                forced, state.applied_nonfinite_steps
            ),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# -------------------------------------------------------------------- spikes
class SpikeGuardState(NamedTuple):
    """State of :func:`spike_guard`.

    Attributes:
        inner_state: State of the wrapped transformation.
        spike_steps: Steps that acted (z-score spikes and non-finite steps);
            int32 scalar, saturating.
        nonfinite_steps: Steps with a NaN or Inf in the gradients or the loss
            (also counted in ``spike_steps``); int32 scalar, saturating.
        consecutive_spikes: Spikes in a row up to now, 0 after an accepted
            step; int32 scalar, saturating. A value that keeps growing means
            the loss or norm moved to a new level that every step now exceeds.
        accepted_steps: Steps whose values entered the histories (finite and
            not spikes); int32 scalar, saturating.
        loss_z: z-score of the last loss against the loss history; float32
            scalar, 0 during warm-up or when no loss is passed, NaN or Inf
            for a non-finite loss.
        norm_z: z-score of the last global gradient norm against the norm
            history; float32 scalar, 0 during warm-up, NaN or Inf for
            non-finite gradients.
        loss_history: :class:`optax_stab._ring.RingBuffer` of the last
            ``window`` accepted losses (float32 scalars).
        norm_history: :class:`optax_stab._ring.RingBuffer` of the last
            ``window`` accepted global gradient norms (float32 scalars).
    """

    inner_state: Any
    spike_steps: jax.Array
    nonfinite_steps: jax.Array
    consecutive_spikes: jax.Array
    accepted_steps: jax.Array
    loss_z: jax.Array
    norm_z: jax.Array
    loss_history: _ring.RingBuffer
    norm_history: _ring.RingBuffer


def _history_z(ring, x, ready):
    """z-score of ``x`` against a scalar ring and the value at ``z_threshold``."""
    mean, std = _ring.masked_mean_std(ring)
    active = ready & (ring.filled >= 2)
    z = jnp.where(active, _numerics.zscore(x, mean, std), jnp.zeros_like(x))
    return z, active, mean, _numerics.floored_std(mean, std)


def spike_guard(
    inner: optax.GradientTransformation,
    *,
    window: int = 128,
    z_threshold: jax.typing.ArrayLike = 6.0,
    warmup_steps: jax.typing.ArrayLike = 20,
    action: str = "skip",
    watch: str = "both",
    max_consecutive: jax.typing.ArrayLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Skips, rescales or resets on loss or gradient-norm spikes (and NaN/Inf).

    The guard keeps rolling histories (ring buffers of ``window`` float32
    scalars) of the accepted losses and global gradient norms. With
    :math:`\mu, \sigma` the mean and population standard deviation of the
    history (the current step excluded; :math:`\sigma` floored at
    :math:`10^{-3}|\mu|` so a constant history does not flag rounding noise),
    a value :math:`x_t` is a spike when

    .. math::
        z_t = (x_t - \mu) / \sigma > z_{\mathrm{threshold}},

    tested once ``warmup_steps`` steps were accepted and the history holds
    at least 2 values. Only upward spikes count. ``watch`` selects the
    watched values: ``"both"``, ``"loss"`` or ``"grad_norm"``; the loss is
    watched only when ``loss=`` is passed (without it, ``watch="loss"``
    acts only on non-finite gradients). A step whose gradients or loss hold a
    NaN or an Inf (or whose float32 norm overflows) always acts, whatever
    ``watch``, and is counted in ``nonfinite_steps`` too.

    On a spike, ``action`` decides:

    * ``"skip"``: zero update (gradients' dtype), ``inner_state`` bit for bit
      unchanged;
    * ``"rescale"``: the gradients are scaled so that their norm equals the
      threshold :math:`\mu_n + z_{\mathrm{threshold}}\,\sigma_n` of the norm
      history, then ``inner`` runs on them (a spike of the loss alone whose
      norm is already below the threshold passes unchanged);
    * ``"reset"``: ``inner_state`` is replaced by ``inner.init(params)`` (the
      updates stand in for ``params`` when it is ``None``), then ``inner``
      runs on the gradients.

    Non-finite steps are always skipped, whatever ``action``. Neither spikes
    nor non-finite values enter the histories, so one spike never inflates the
    threshold for the next. Every acting step is counted in ``spike_steps``.
    The inner update is always computed and selected arithmetically (no
    ``lax.cond``, no host sync). Extra arguments are forwarded to ``inner``.
    Memory: ``2 x window`` float32 scalars besides ``inner_state``.

    Args:
        inner: The transformation to guard.
        window: Length of the histories; a static int >= 2 (list it in
            ``static_args`` of ``optax.inject_hyperparams``).
        z_threshold: z-score above which a step is a spike; > 0.
        warmup_steps: Accepted steps before spikes are tested; an integer >= 0.
        action: ``"skip"``, ``"rescale"`` or ``"reset"``.
        watch: ``"both"``, ``"loss"`` or ``"grad_norm"``.
        max_consecutive: If given, an integer >= 1: the finite spike that
            follows ``max_consecutive`` acted-on spikes in a row is accepted:
            applied like a normal step and written into the histories, so a
            lasting level shift becomes the new normal instead of stalling
            training. It still counts in ``spike_steps``. ``None`` (default):
            spikes are never accepted. Non-finite steps always act.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs` whose state is a
        :class:`SpikeGuardState`.

    Raises:
        ValueError: If a hyperparameter is out of range or an option unknown;
            at trace time, if ``loss=`` is not a scalar.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax
        >>> import optax_stab
        >>> tx = optax_stab.spike_guard(optax.sgd(1.0), window=8, warmup_steps=3)
        >>> state = tx.init(jnp.zeros(2))
        >>> for g in ([1.0, 1.0], [2.0, 2.0], [1.0, 1.0], [2.0, 2.0]):
        ...     u, state = tx.update(jnp.array(g), state, loss=2.0)
        >>> u, state = tx.update(jnp.array([1e3, 1e3]), state, loss=2.0)
        >>> print(u, int(state.spike_steps), int(state.accepted_steps))
        [0. 0.] 1 4
        >>> u, state = tx.update(jnp.array([1.0, 1.0]), state, loss=jnp.nan)
        >>> print(u, int(state.spike_steps), int(state.nonfinite_steps))
        [0. 0.] 2 1

    References:
        Groeneveld et al., `OLMo: Accelerating the Science of Language Models
        <https://arxiv.org/abs/2402.00838>`_, 2024 (OLMo-core's skip step).

    .. note:: With ``max_consecutive=None`` a lasting upward level shift
       (every later step a spike) is never accepted into the histories: watch
       ``consecutive_spikes``, or set ``max_consecutive``.

    .. seealso:: :func:`guard_nonfinite`, :func:`optax_stab.zscore_clip`.
    """
    _validate.check_int("window", window, low=2)
    _validate.check_interval("z_threshold", z_threshold, low=0.0)
    _validate.check_count("warmup_steps", warmup_steps, low=0)
    _validate.check_choice("action", action, _ACTIONS)
    _validate.check_choice("watch", watch, _WATCH)
    if max_consecutive is not None:
        _validate.check_count("max_consecutive", max_consecutive, low=1)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        zero = jnp.zeros([], jnp.float32)
        return SpikeGuardState(
            inner_state=inner.init(params),
            spike_steps=_numerics.zero_count(),
            nonfinite_steps=_numerics.zero_count(),
            consecutive_spikes=_numerics.zero_count(),
            accepted_steps=_numerics.zero_count(),
            loss_z=zero,
            norm_z=zero,
            loss_history=_ring.init_scalar(window),
            norm_history=_ring.init_scalar(window),
        )

    def update_fn(updates, state, params=None, **extra_args):
        loss = _loss_of(extra_args)
        thr = _numerics.as_stat(z_threshold)
        ready = state.accepted_steps.astype(jnp.float32) >= _numerics.as_stat(
            warmup_steps
        )
        norm = _tree.global_norm(updates)
        norm_z, norm_on, mu, sigma = _history_z(state.norm_history, norm, ready)
        nonfinite = ~jnp.isfinite(norm)
        spike = jnp.zeros([], bool)
        if watch in ("both", "grad_norm"):
            spike = norm_on & (norm_z > thr)
        loss_z = jnp.zeros([], jnp.float32)
        if loss is not None:
            nonfinite = nonfinite | ~jnp.isfinite(loss)
            loss_z, loss_on, _, _ = _history_z(state.loss_history, loss, ready)
            if watch in ("both", "loss"):
                spike = spike | (loss_on & (loss_z > thr))
        spike = spike | nonfinite
        consecutive = jnp.where(
            spike,
            optax.safe_increment(state.consecutive_spikes),
            jnp.zeros_like(state.consecutive_spikes),
        )
        acting = spike
        if max_consecutive is not None:
            limit = _numerics.as_stat(max_consecutive)
            forced = spike & ~nonfinite & (consecutive.astype(jnp.float32) > limit)
            acting = spike & ~forced
            consecutive = jnp.where(forced, jnp.zeros_like(consecutive), consecutive)

        grads, inner_state = updates, state.inner_state
        skip = nonfinite if action != "skip" else acting
        act = acting & ~nonfinite
        if action == "rescale":
            limit = jnp.where(act, mu + thr * sigma, jnp.inf)
            grads, _ = _tree.clip_to_norm(updates, norm, limit)
        elif action == "reset":
            fresh = inner.init(updates if params is None else params)
            inner_state = _tree.select(
                act, _tree.cast_like(fresh, inner_state), inner_state
            )
        out, new_inner = inner.update(grads, inner_state, params, **extra_args)

        accepted = ~acting
        loss_history = state.loss_history
        if loss is not None:
            loss_history = _ring.push(loss_history, loss, where=accepted)
        return _zero_where(skip, out), SpikeGuardState(
            inner_state=_tree.select(skip, state.inner_state, new_inner),
            spike_steps=_numerics.increment_if(spike, state.spike_steps),
            nonfinite_steps=_numerics.increment_if(nonfinite, state.nonfinite_steps),
            consecutive_spikes=consecutive,
            accepted_steps=_numerics.increment_if(accepted, state.accepted_steps),
            loss_z=loss_z.astype(jnp.float32),
            norm_z=norm_z.astype(jnp.float32),
            loss_history=loss_history,
            norm_history=_ring.push(state.norm_history, norm, where=accepted),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
