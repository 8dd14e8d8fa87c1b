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

**Many devices.** Under ``shard_map`` or ``pmap`` each device sees only its
shard; pass the axis as ``axis_name=`` and the guards reduce over it (norms
summed, non-finite flags OR-ed, ``loss=`` averaged), so every device makes
the same decision and keeps the same state. Under plain ``jit`` with sharded
arrays (GSPMD, multi-host ``jax.distributed``) values are already global and
no ``axis_name`` is needed.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_stab import _numerics, _ring, _tree, _validate

_ACTIONS = ("skip", "rescale", "reset")
_WATCH = ("both", "loss", "grad_norm")


def _loss_of(extra_args: dict[str, Any], axis_name: Any = None) -> jax.Array | None:
    """The ``loss=`` extra argument as a float32 scalar, or None if absent.

    With ``axis_name``, the mean of the devices' losses along that axis (a
    loss that is the same on every device is unchanged; a NaN or Inf on one
    device makes the mean non-finite on all).
    """
    loss = extra_args.get("loss")
    if loss is None:
        return None
    loss = jnp.asarray(loss)
    if loss.ndim != 0:
        raise ValueError(
            f"`loss` passed to a guard must be a scalar, got shape {loss.shape}."
        )
    loss = loss.astype(jnp.float32)
    return loss if axis_name is None else jax.lax.pmean(loss, axis_name)


def _zero_where(pred: jax.Array, updates: Any) -> Any:
    """Zero update (in each leaf's dtype) where ``pred`` holds."""
    return jax.tree.map(lambda u: jnp.where(pred, jnp.zeros_like(u), u), updates)


SKIP_FRACTION_DECAY = 0.99
"""Decay of the ``skip_fraction`` EMA of both guards (about the last 100 steps)."""

SPIKE_MAX_CONSECUTIVE = 8
"""Default ``max_consecutive`` of :func:`spike_guard`."""


def _bounded_run(
    bad: jax.Array,
    run: jax.Array,
    max_consecutive: jax.typing.ArrayLike | None,
    always: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The one meaning of ``max_consecutive``, shared by both guards.

    A bad step is acted on (skipped, rescaled or reset) only while fewer than
    ``max_consecutive`` steps in a row have been acted on; the bad step that
    follows such a run is *forced*: applied as a normal step, which ends the
    run. ``None`` acts on every bad step. Steps in ``always`` are acted on
    whatever the run (and extend it).

    Args:
        bad: bool scalar, this step would be acted on.
        run: int32 scalar, steps acted on in a row before this one.
        max_consecutive: The bound, an integer >= 0, or ``None``.
        always: Optional bool scalar of steps acted on regardless.

    Returns:
        ``(act, forced, run)``: whether this step is acted on, whether it is a
        bad step applied because of the bound, and the updated run length
        (saturating; 0 after a step that is not acted on).
    """
    act = bad
    if max_consecutive is not None:
        act = bad & (run.astype(jnp.float32) < _numerics.as_stat(max_consecutive))
    if always is not None:
        act = act | always
    forced = bad & ~act
    run = jnp.where(act, optax.safe_increment(run), jnp.zeros_like(run))
    return act, forced, run


def _skip_fraction(fraction: jax.Array, skipped: jax.Array) -> jax.Array:
    """EMA update of the fraction of skipped steps (float32 scalar)."""
    skipped = skipped.astype(jnp.float32)
    return _numerics.ema(fraction, skipped, SKIP_FRACTION_DECAY).astype(jnp.float32)


# ---------------------------------------------------------------- nonfinite
class GuardNonfiniteState(NamedTuple):
    """State of :func:`guard_nonfinite`.

    Attributes:
        inner_state: State of the wrapped transformation.
        nonfinite_steps: Steps with a NaN or Inf in the gradients or the loss,
            skipped or not; int32 scalar, saturating.
        consecutive_nonfinite: Non-finite steps skipped in a row up to now; 0
            after an applied step; int32 scalar, saturating.
        applied_nonfinite_steps: Non-finite steps passed to ``inner`` anyway
            because ``max_consecutive`` steps in a row had been skipped; int32
            scalar, saturating.
        skip_fraction: EMA (decay ``SKIP_FRACTION_DECAY`` = 0.99, about the
            last 100 steps; starts at 0) of 1.0 for a skipped step and 0.0 for
            an applied one; float32 scalar. :func:`optax_stab.health_report`
            turns it into ``guard_stalled``.
    """

    inner_state: Any
    nonfinite_steps: jax.Array
    consecutive_nonfinite: jax.Array
    applied_nonfinite_steps: jax.Array
    skip_fraction: jax.Array


def guard_nonfinite(
    inner: optax.GradientTransformation,
    *,
    max_consecutive: jax.typing.ArrayLike | None = None,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Skips every step whose gradients or loss hold a NaN or an Inf.

    A step is bad when any gradient leaf holds NaN, +Inf or -Inf, or when the
    ``loss=`` extra argument is given and is not finite. A bad step returns a
    zero update (in the gradients' dtype) and leaves ``inner_state`` bit for
    bit unchanged; it is counted in ``nonfinite_steps`` and
    ``consecutive_nonfinite``.

    ``max_consecutive`` has the meaning it has in :func:`spike_guard`: **at
    most** ``max_consecutive`` **steps in a row are skipped; the next one is
    applied**. After ``max_consecutive`` skipped bad steps in a row, the next
    bad step is passed to ``inner`` anyway (the inner transformation decides
    what to do with it), counted in ``applied_nonfinite_steps``, and starts a
    new run. Any applied step resets ``consecutive_nonfinite`` to 0.

    Unlike ``optax.apply_if_finite``, the loss is checked too. The inner
    update is always computed and selected arithmetically (no ``lax.cond``),
    so the guard costs one pass over the gradients (the finiteness test) and
    one select over the inner state. Extra arguments (``loss=`` and others)
    are forwarded to ``inner``.

    **Speed with donated state on CPU.** The select reads the old inner
    state while the new one is written over the donated buffers. With its
    default options XLA:CPU then copies the inner state on every step:
    ``guard_nonfinite(optax.adam(...))`` plus ``optax.apply_updates`` took
    3.4x the step of Adam alone at 8M float32 in 16 leaves. Compile the
    step with ``jax.jit(step, donate_argnums=...,
    compiler_options={"xla_cpu_copy_insertion_use_region_analysis": True})``
    and XLA orders the reads before the writes instead: 1.2x, no copy
    (``docs/benchmarks.md``, "Copies"). XLA:GPU makes no such copy.

    Args:
        inner: The transformation to guard.
        max_consecutive: Bad steps in a row that are skipped, an integer >= 0
            (0 applies every step but still counts them). ``None`` (default)
            skips every bad step, however many: parameters and inner state can
            never be poisoned by a NaN, but if the gradients stay non-finite
            training stops for good. ``consecutive_nonfinite`` and
            ``skip_fraction`` show it, and :func:`optax_stab.health_report`
            sets ``guard_stalled``.
        axis_name: A ``pmap`` or ``shard_map`` axis over which the gradients
            are split (or replicated). The non-finite flag is OR-ed across it
            and ``loss=`` is averaged over it (``lax.pmean``; a loss that is
            already global, the same on every device, is unchanged by the
            mean), so a NaN in one device's shard or loss makes every device
            skip, and all devices keep identical counters. ``None`` (default)
            decides from the local values. Not needed under plain ``jit``
            with sharded arrays (GSPMD), where the values are already global.

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
    _validate.check_transform("inner", inner)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        _validate.check_tree("guard_nonfinite", params)
        return GuardNonfiniteState(
            inner_state=inner.init(params),
            nonfinite_steps=_numerics.zero_count(),
            consecutive_nonfinite=_numerics.zero_count(),
            applied_nonfinite_steps=_numerics.zero_count(),
            skip_fraction=jnp.zeros([], jnp.float32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        loss = _loss_of(extra_args, axis_name)
        bad = ~_tree.all_finite(updates, axis_name=axis_name)
        if loss is not None:
            bad = bad | ~jnp.isfinite(loss)
        skip, forced, consecutive = _bounded_run(
            bad, state.consecutive_nonfinite, max_consecutive
        )
        out, inner_state = inner.update(
            updates, state.inner_state, params, **extra_args
        )
        skip_leaves = _tree.decided(skip)
        return _zero_where(skip_leaves, out), GuardNonfiniteState(
            inner_state=optax.tree.where(skip_leaves, state.inner_state, inner_state),
            nonfinite_steps=_numerics.increment_if(bad, state.nonfinite_steps),
            consecutive_nonfinite=consecutive,
            applied_nonfinite_steps=_numerics.increment_if(
                forced, state.applied_nonfinite_steps
            ),
            skip_fraction=_skip_fraction(state.skip_fraction, skip),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# -------------------------------------------------------------------- spikes
class SpikeGuardState(NamedTuple):
    """State of :func:`spike_guard`.

    Attributes:
        inner_state: State of the wrapped transformation.
        spike_steps: Steps acted on (skipped, rescaled or reset): spikes and
            non-finite steps; int32 scalar, saturating. With ``action="skip"``
            these are exactly the skipped steps.
        nonfinite_steps: Steps with a NaN or Inf in the gradients or the loss
            (also counted in ``spike_steps``); int32 scalar, saturating.
        consecutive_spikes: Steps acted on in a row up to now, 0 after a step
            that is applied unchanged; int32 scalar, saturating. Only
            non-finite steps can take it above ``max_consecutive``.
        accepted_steps: Steps applied unchanged (not acted on), spikes applied
            because of ``max_consecutive`` included; int32 scalar, saturating.
            ``accepted_steps + spike_steps`` is the number of updates.
        applied_spike_steps: Spikes applied unchanged because
            ``max_consecutive`` steps in a row had been acted on; int32
            scalar, saturating.
        skip_fraction: EMA (decay ``SKIP_FRACTION_DECAY`` = 0.99, about the
            last 100 steps; starts at 0) of 1.0 for a skipped step (zero
            update) and 0.0 otherwise; float32 scalar.
            :func:`optax_stab.health_report` turns it into ``guard_stalled``.
        loss_z: z-score of the last loss against the loss history; float32
            scalar, 0 during warm-up or when no loss is passed, NaN or Inf
            for a non-finite loss.
        norm_z: z-score of the last global gradient norm against the norm
            history; float32 scalar, 0 during warm-up, NaN or Inf for
            non-finite gradients.
        loss_history: :class:`optax_stab._ring.RingBuffer` of the last
            ``window`` finite losses (float32 scalars); the first spike of a
            run is clipped to the threshold, later ones are kept as they are.
        norm_history: :class:`optax_stab._ring.RingBuffer` of the last
            ``window`` finite global gradient norms, like ``loss_history``.
    """

    inner_state: Any
    spike_steps: jax.Array
    nonfinite_steps: jax.Array
    consecutive_spikes: jax.Array
    accepted_steps: jax.Array
    applied_spike_steps: jax.Array
    skip_fraction: jax.Array
    loss_z: jax.Array
    norm_z: jax.Array
    loss_history: _ring.RingBuffer
    norm_history: _ring.RingBuffer


class _Detection(NamedTuple):
    """What :func:`spike_guard`'s detect step found (float32 / bool scalars)."""

    norm: jax.Array  # global norm of the updates
    norm_z: jax.Array
    norm_limit: jax.Array  # the norm at the spike threshold
    loss_z: jax.Array
    loss_limit: jax.Array
    nonfinite: jax.Array  # a NaN/Inf in the updates or the loss
    acting: jax.Array  # act on this step (spike within the bound, or non-finite)
    forced: jax.Array  # a spike applied because of max_consecutive
    consecutive: jax.Array  # new run length of acted-on steps


def _history_test(ring, x, ready, z_threshold, min_relative):
    """z-score of ``x`` against a scalar ring, spike flag and threshold value."""
    mean, std = _ring.masked_mean_std(ring)
    sigma = _numerics.floored_std(mean, std)
    active = ready & (ring.filled >= 2)
    z = jnp.where(active, _numerics.zscore(x, mean, std), jnp.zeros_like(x))
    limit = mean + jnp.maximum(z_threshold * sigma, min_relative * jnp.abs(mean))
    return z, active & (x > limit), limit


def spike_guard(
    inner: optax.GradientTransformation,
    *,
    window: int = 128,
    z_threshold: jax.typing.ArrayLike = 6.0,
    min_relative: jax.typing.ArrayLike = 0.1,
    warmup_steps: jax.typing.ArrayLike = 20,
    action: str = "skip",
    watch: str = "both",
    max_consecutive: jax.typing.ArrayLike | None = SPIKE_MAX_CONSECUTIVE,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Skips, rescales or resets on loss or gradient-norm spikes (and NaN/Inf).

    The guard keeps rolling histories (ring buffers of ``window`` float32
    scalars) of the finite losses and global gradient norms of the last
    ``window`` steps. With :math:`\mu, \sigma` the mean and population
    standard deviation of a history (the current step excluded;
    :math:`\sigma` floored at :math:`10^{-3}|\mu|`), a value :math:`x_t` is a
    spike when it exceeds the threshold

    .. math::
        \mu + \max(z_{\mathrm{threshold}}\,\sigma,\;
        \mathrm{min\_relative}\,|\mu|),

    i.e. when its z-score :math:`(x_t - \mu)/\sigma` is above ``z_threshold``
    *and* it is more than ``min_relative`` (10%) above the mean. Spikes are
    tested once ``warmup_steps`` steps were accepted and the history holds at
    least 2 values. Only upward spikes count. ``watch`` selects the watched
    values: ``"both"``, ``"loss"`` or ``"grad_norm"``; the loss is watched
    only when ``loss=`` is passed (without it, ``watch="loss"`` acts only on
    non-finite gradients). A step whose gradients or loss hold a NaN or an
    Inf (or whose norm is beyond float32's max, about ``3.4e38``: smaller
    finite gradients have finite norms) always acts, whatever ``watch``, is
    always skipped, whatever ``action``, and is counted in
    ``nonfinite_steps`` too; non-finite values never reach ``inner_state``
    or the histories.

    On a spike, ``action`` decides:

    * ``"skip"``: zero update (gradients' dtype), ``inner_state`` bit for bit
      unchanged;
    * ``"rescale"``: the gradients are scaled so that their norm equals the
      norm history's threshold, then ``inner`` runs on them (a spike of the
      loss alone whose norm is already below it passes unchanged);
    * ``"reset"``: ``inner_state`` is replaced by ``inner.init(params)`` (the
      updates stand in for ``params`` when it is ``None``), then ``inner``
      runs on the gradients.

    **Bound.** At most ``max_consecutive`` (default 8) steps in a row are
    acted on: a finite spike that follows ``max_consecutive`` acted-on steps
    in a row is applied unchanged (counted in ``applied_spike_steps`` and
    ``accepted_steps``), which ends the run. So with ``action="skip"`` no
    more than ``max_consecutive`` finite steps in a row are skipped; only
    non-finite steps can make a run longer. :func:`guard_nonfinite` gives
    ``max_consecutive`` the same meaning.

    **Histories.** Spikes enter the histories too, as in OLMo-core's
    ``SkipStepOptimizer``, Levanter's ``SkipStepConfig`` and MaxText's
    ``skip_step_on_spikes``: a loss or norm that moves to a new level for
    good (a loss that rises after an instability, a new data mix) must
    become the new normal, or every later step is a spike and training
    freezes. The first spike of a run enters clipped to the threshold, so an
    isolated outlier (a corrupted batch) does not inflate :math:`\sigma` and
    hide the next one; the later spikes of the run enter as they are. Against
    a full history holding :math:`k` values at a new level, a value at that
    level has the z-score :math:`\approx\sqrt{(\mathrm{window} - k)/k}`, so a
    lasting level shift is accepted after
    :math:`1 + \lceil \mathrm{window} / (1 + z_{\mathrm{threshold}}^2) \rceil`
    skipped steps (5 with the defaults), before the bound; the bound covers
    values that keep growing (``"rescale"`` or ``"reset"`` on a diverging
    run) and long windows. ``min_relative`` keeps a smooth, low-noise loss
    from turning a rise of a few percent into a large z-score (the z-test
    alone flags a rise of 0.6% over a constant history). The defaults were
    checked on a 10-layer ReLU MLP trained with Adam at unstable learning
    rates (``examples/guard_freeze.py``): every step with z > 6 there was
    more than 2.6 times the mean, so ``min_relative`` changes nothing, and
    with no bound the longest run of skipped steps was 7, so the bound of 8
    does not cut detection short.

    Every acting step is counted in ``spike_steps``. The inner update is
    always computed and selected arithmetically (no ``lax.cond``, no host
    sync). Extra arguments are forwarded to ``inner``. Memory:
    ``2 x window`` float32 scalars besides ``inner_state``. On CPU with
    donated state, compile the step with
    ``compiler_options={"xla_cpu_copy_insertion_use_region_analysis": True}``
    as :func:`guard_nonfinite` says: without it XLA:CPU copies the inner
    state every step (at 8M float32 in 16 leaves, ``spike_guard(adam)`` plus
    ``apply_updates`` took 3.5x Adam's step without it, 1.2x with it; on
    GPU no copy is made).

    Args:
        inner: The transformation to guard.
        window: Length of the histories; a static int >= 2 (list it in
            ``static_args`` of ``optax.inject_hyperparams``).
        z_threshold: z-score above which a step can be a spike; > 0.
        min_relative: Relative rise over the mean below which a step is never
            a spike; >= 0 (0 leaves the z-score alone).
        warmup_steps: Accepted steps before spikes are tested; an integer >= 0.
        action: ``"skip"``, ``"rescale"`` or ``"reset"``.
        watch: ``"both"``, ``"loss"`` or ``"grad_norm"``.
        max_consecutive: Most steps in a row acted on, an integer >= 0 (0
            only counts spikes); default 8. ``None`` acts on every spike,
            however many in a row: a value that stays above the threshold can
            then keep skipping (or resetting) forever, freezing training; use
            it only with a window and threshold where a level shift is
            absorbed, and watch ``consecutive_spikes`` or ``guard_stalled``.
        axis_name: A ``pmap`` or ``shard_map`` axis over which the gradients
            are split (FSDP or model-parallel shards, each device holding a
            slice of every split leaf). Squared norms are summed across it, so
            the watched norm (and ``"rescale"``'s scale) is the full
            gradient's, and a NaN or Inf on any device makes it non-finite on
            all; ``loss=`` is averaged over it (``lax.pmean``; a loss that is
            already global, the same on every device, is unchanged by the
            mean). Every device then takes the same decision and keeps
            identical counters and histories. Gradients replicated on every
            device (data parallelism after a ``pmean``) would count once per
            device: pass no ``axis_name`` there, and a global loss
            (``lax.pmean(loss, axis)``). ``None`` (default) decides from the
            local values. Not needed under plain ``jit`` with sharded arrays
            (GSPMD), where norms are already global.

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

    .. seealso:: :func:`guard_nonfinite`, :func:`optax_stab.zscore_clip`.
    """
    _validate.check_int("window", window, low=2)
    _validate.check_interval("z_threshold", z_threshold, low=0.0)
    _validate.check_interval("min_relative", min_relative, low=0.0, low_closed=True)
    _validate.check_count("warmup_steps", warmup_steps, low=0)
    _validate.check_choice("action", action, _ACTIONS)
    _validate.check_choice("watch", watch, _WATCH)
    if max_consecutive is not None:
        _validate.check_count("max_consecutive", max_consecutive, low=0)
    _validate.check_transform("inner", inner)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        _validate.check_tree("spike_guard", params)

        def zero():  # a fresh buffer per field, so the state can be donated
            return jnp.zeros([], jnp.float32)

        return SpikeGuardState(
            inner_state=inner.init(params),
            spike_steps=_numerics.zero_count(),
            nonfinite_steps=_numerics.zero_count(),
            consecutive_spikes=_numerics.zero_count(),
            accepted_steps=_numerics.zero_count(),
            applied_spike_steps=_numerics.zero_count(),
            skip_fraction=zero(),
            loss_z=zero(),
            norm_z=zero(),
            loss_history=_ring.init_scalar(window),
            norm_history=_ring.init_scalar(window),
        )

    def detect(updates, state, loss) -> _Detection:
        """Scores the norm and loss against their histories; decides to act."""
        thr = _numerics.as_stat(z_threshold)
        rel = _numerics.as_stat(min_relative)
        ready = state.accepted_steps.astype(jnp.float32) >= _numerics.as_stat(
            warmup_steps
        )
        norm = _tree.global_norm(updates, axis_name=axis_name).astype(jnp.float32)
        norm_z, norm_spike, norm_limit = _history_test(
            state.norm_history, norm, ready, thr, rel
        )
        nonfinite = ~jnp.isfinite(norm)
        spike = jnp.zeros([], bool)
        if watch in ("both", "grad_norm"):
            spike = norm_spike
        loss_z = loss_limit = jnp.zeros([], jnp.float32)
        if loss is not None:
            nonfinite = nonfinite | ~jnp.isfinite(loss)
            loss_z, loss_spike, loss_limit = _history_test(
                state.loss_history, loss, ready, thr, rel
            )
            if watch in ("both", "loss"):
                spike = spike | loss_spike
        acting, forced, consecutive = _bounded_run(
            spike & ~nonfinite,
            state.consecutive_spikes,
            max_consecutive,
            always=nonfinite,
        )
        return _Detection(
            norm,
            norm_z,
            norm_limit,
            loss_z,
            loss_limit,
            nonfinite,
            acting,
            forced,
            consecutive,
        )

    def act(d: _Detection, updates, state, params, extra_args):
        """Skips, rescales or resets as ``action`` says; returns out, inner state."""
        grads, inner_state = updates, state.inner_state
        skip = d.acting if action == "skip" else d.nonfinite
        # Read by every leaf's kernel: computed once (_tree.decided).
        skip_leaves = _tree.decided(skip)
        acted = _tree.decided(d.acting & ~d.nonfinite)
        if action == "rescale":
            limit = jnp.where(acted, d.norm_limit, jnp.inf)
            grads, _ = _tree.clip_to_norm(updates, d.norm, limit)
        elif action == "reset":
            fresh = inner.init(updates if params is None else params)
            inner_state = optax.tree.where(
                acted, optax.tree.cast_like(fresh, inner_state), inner_state
            )
        out, new_inner = inner.update(grads, inner_state, params, **extra_args)
        new_inner = optax.tree.where(skip_leaves, state.inner_state, new_inner)
        return _zero_where(skip_leaves, out), new_inner, skip

    def update_fn(updates, state, params=None, **extra_args):
        loss = _loss_of(extra_args, axis_name)
        d = detect(updates, state, loss)
        out, inner_state, skip = act(d, updates, state, params, extra_args)

        # The first spike of a run enters the histories clipped to the
        # threshold, later ones as they are ("Histories" in the docstring).
        finite = ~d.nonfinite
        first = d.acting & finite & (state.consecutive_spikes == 0)
        norm_in = jnp.where(first, jnp.minimum(d.norm, d.norm_limit), d.norm)
        loss_history = state.loss_history
        if loss is not None:
            loss_in = jnp.where(first, jnp.minimum(loss, d.loss_limit), loss)
            loss_history = _ring.push(loss_history, loss_in, where=finite)
        return out, SpikeGuardState(
            inner_state=inner_state,
            spike_steps=_numerics.increment_if(d.acting, state.spike_steps),
            nonfinite_steps=_numerics.increment_if(d.nonfinite, state.nonfinite_steps),
            consecutive_spikes=d.consecutive,
            accepted_steps=_numerics.increment_if(~d.acting, state.accepted_steps),
            applied_spike_steps=_numerics.increment_if(
                d.forced, state.applied_spike_steps
            ),
            skip_fraction=_skip_fraction(state.skip_fraction, skip),
            loss_z=d.loss_z.astype(jnp.float32),
            norm_z=d.norm_z.astype(jnp.float32),
            loss_history=loss_history,
            norm_history=_ring.push(state.norm_history, norm_in, where=finite),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
