"""Every public transform, with small hyperparameters, for the invariant suite.

Add one ``Entry`` per public factory (in the section of its module). The suite
in ``test_invariants.py`` runs each entry through jit (state donated), vmap,
pmap, scan, sharding, chain (with a varying ``loss=``), MultiSteps,
inject_hyperparams, masking, dtypes, non-finite inputs and a convex descent.
Never special-case a transform in the suite: describe it here instead. A
public name of ``optax_stab.__all__`` that no entry builds must be listed in
``EXCLUDED`` with the reason (``test_registry_covers_every_public_factory``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import optax

import optax_stab


class Descent(NamedTuple):
    """How an entry, chained before ``optax.sgd(lr)``, descends the quadratic.

    The suite minimises ``0.5 * sum(h * (x - x_star)**2)`` (curvatures ``h`` in
    [0.5, 2], the parameter tree of the suite) for ``steps`` steps from a
    fixed start, passing ``loss=`` to every update.

    Attributes:
        lr: Learning rate of the ``optax.sgd`` after the entry.
        steps: Number of steps.
        max_ratio: Bound on final loss / initial loss.
        monotone: Whether the loss may never rise (no step overshoots).
        like: If set, on this smooth descent the entry must act exactly like
            ``like`` (a guard with no spike acts like its inner transform).
    """

    lr: float
    steps: int
    max_ratio: float
    monotone: bool = False
    like: optax.GradientTransformation | None = None


# Plain SGD with lr 0.1 (lr * h in [0.05, 0.2]) reaches 0.0086 of the initial
# loss in 30 steps (closed form: sum h e0^2 (1 - lr h)^60 / sum h e0^2). The
# bound 0.25 lets a transform shorten or delay the steps by up to ~3.5x on
# average (log 0.25 / log 0.0086 = 0.29) and still fails one that stalls
# (steps scaled by 0.1 end at ~0.5) or turns the steps around (the loss grows).
# SCALED: each coordinate's step is the gradient times a factor in [0, 1]
# (clippers, identities, box projection from inside the box); with lr * h < 1
# no coordinate overshoots its optimum, so the loss can never rise.
SCALED = Descent(lr=0.1, steps=30, max_ratio=0.25, monotone=True)
# FILTERED: a causal positive-weight average of past gradients (plus the
# gradient, for amplify_slow). On a decaying gradient sequence the average is
# at least the current gradient, so it descends at least as fast as SGD until
# it overshoots; lr * h_max * window = 0.2 * 5 = 1 keeps the delayed iteration
# stable, but a lagging filter may overshoot a little: no monotonicity.
FILTERED = Descent(lr=0.1, steps=30, max_ratio=0.25)
# AMPLIFIED: sign(g) |g|^p keeps each coordinate's sign, so it descends; for
# |g| < 1 it lengthens the step and oscillates in a band of width ~ lr^2 h / 4
# (2.5e-3 here) around the optimum, far below the initial error.
AMPLIFIED = Descent(lr=0.1, steps=30, max_ratio=0.25)
# PENALISED: add_l1_penalty(0.1) descends f + 0.1 |x|_1, whose minimiser has
# f <= sum 0.5 * 0.1^2 / h = 0.55 = 0.19 of the initial loss (2.87 here).
PENALISED = Descent(lr=0.1, steps=30, max_ratio=0.25)
# SCHEDULED: inverse_sqrt_decay(0.5, 2, 3) scales the steps by 0.5 / sqrt(1 +
# 2 t / 3) (0.13 on average over 30 steps), so the lr doubles to 0.2.
SCHEDULED = Descent(lr=0.2, steps=30, max_ratio=0.25, monotone=True)
# GUARDED: the guards wrap momentum (optax.trace(0.5)), i.e. heavy ball with
# lr 0.04: lr * h_max = 0.08 <= (1 - sqrt(0.5))^2 = 0.086, so every coordinate
# decays without oscillating (no loss or norm spike to act on) at the rate
# lr * h / (1 - 0.5) >= 0.04 per step: the slowest error shrinks to
# exp(-1.2) = 0.3 in 30 steps.
GUARD_INNER = optax.trace(decay=0.5)
GUARDED = Descent(lr=0.04, steps=30, max_ratio=0.25, like=GUARD_INNER)


class Entry(NamedTuple):
    """How to build one transform for the invariant suite.

    Attributes:
        name: Test id.
        factory: The public factory.
        kwargs: Small, fast hyperparameters (windows <= 5, warm-ups <= 3).
        static_args: Arguments ``optax.inject_hyperparams`` must keep static
            (window lengths and other structural ints).
            Callable kwargs that are not schedules (dtypes) belong here too.
        sweep: ``(name, values)`` of a float hyperparameter that
            ``inject_hyperparams`` + ``vmap`` sweeps, switching to each value
            mid-run; required when ``kwargs`` holds a float (the suite checks
            it). At least one value must change the outputs or the state.
        descent: How it descends a convex quadratic before ``optax.sgd``.
        reads_loss: Whether the ``loss=`` extra argument changes its state or
            outputs (the chain test checks both ways).
    """

    name: str
    factory: Callable[..., optax.GradientTransformation]
    kwargs: dict[str, Any]
    static_args: tuple[str, ...] = ()
    sweep: tuple[str, tuple[float, ...]] | None = None
    descent: Descent = SCALED
    reads_loss: bool = False

    def make(self, **overrides: Any) -> optax.GradientTransformationExtraArgs:
        return self.factory(**{**self.kwargs, **overrides})


def _guard_of_spike_guard(*, axis_name: Any = None):
    """``guard_nonfinite(spike_guard(...))``; ``axis_name`` goes to both guards."""
    inner = optax_stab.spike_guard(
        GUARD_INNER,
        window=3,
        z_threshold=1.0,
        warmup_steps=1,
        watch="loss",
        axis_name=axis_name,
    )
    return optax_stab.guard_nonfinite(inner, axis_name=axis_name)


ENTRIES: list[Entry] = [
    # ---------------------------------------------------------------- _smoothing
    Entry(
        "ema_smoothing",
        optax_stab.ema_smoothing,
        {"decay": 0.8},
        sweep=("decay", (0.0, 0.5, 0.9)),
        descent=FILTERED,
    ),
    Entry(
        "ema_smoothing_bf16_acc",
        optax_stab.ema_smoothing,
        {"decay": 0.8, "accumulator_dtype": jnp.bfloat16},
        static_args=("accumulator_dtype",),
        sweep=("decay", (0.0, 0.9)),
        descent=FILTERED,
    ),
    Entry(
        "moving_average",
        optax_stab.moving_average,
        {"window": 3},
        static_args=("window",),
        descent=FILTERED,
    ),
    Entry(
        "gaussian_smoothing",
        optax_stab.gaussian_smoothing,
        {"window": 4, "sigma": 1.5},
        static_args=("window",),
        sweep=("sigma", (0.5, 1.0, 3.0)),
        descent=FILTERED,
    ),
    Entry(
        "fir_smoothing",
        optax_stab.fir_smoothing,
        {"weights": (3.0, 2.0, 1.0)},
        descent=FILTERED,
    ),
    Entry(
        "windowed_median",
        optax_stab.windowed_median,
        {"window": 4},
        static_args=("window",),
        descent=FILTERED,
    ),
    Entry(
        "windowed_median_bf16_acc",
        optax_stab.windowed_median,
        {"window": 5, "accumulator_dtype": jnp.bfloat16},
        static_args=("window", "accumulator_dtype"),
        descent=FILTERED,
    ),
    Entry(
        "amplify_slow",
        optax_stab.amplify_slow,
        {"strength": 2.0},
        sweep=("strength", (0.0, 1.0, 5.0)),
        descent=FILTERED,
    ),
    Entry(
        "amplify_slow_median",
        optax_stab.amplify_slow,
        {"strength": 1.0, "filter": optax_stab.windowed_median(3)},
        sweep=("strength", (0.0, 3.0)),
        descent=FILTERED,
    ),
    # ---------------------------------------------------------------- _clipping
    Entry(
        "clip_by_norm",
        optax_stab.clip_by_norm,
        {"max_norm": 15.0},
        sweep=("max_norm", (1.0, 15.0, 100.0)),
    ),
    Entry(
        "clip_by_norm_leaf",
        optax_stab.clip_by_norm,
        {"max_norm": 5.0, "scope": "leaf"},
        sweep=("max_norm", (0.0, 5.0, 100.0)),
    ),
    Entry(
        "autoclip",
        optax_stab.autoclip,
        {"percentile": 50.0, "history": 4},
        static_args=("history",),
        sweep=("percentile", (10.0, 50.0, 100.0)),
    ),
    Entry(
        "zscore_clip",
        optax_stab.zscore_clip,
        {"decay": 0.9, "z_threshold": 1.0, "warmup_steps": 2},
        sweep=("z_threshold", (0.5, 1.0, 3.0)),
    ),
    Entry(
        "zscore_clip_mean_capped",
        optax_stab.zscore_clip,
        {"z_threshold": 0.5, "warmup_steps": 3, "mode": "mean", "max_norm": 20.0},
        static_args=("warmup_steps",),
        sweep=("max_norm", (5.0, 20.0, 100.0)),
    ),
    Entry(
        "adaptive_tensor_clip",
        optax_stab.adaptive_tensor_clip,
        {"decay": 0.9, "relative": 1.05, "warmup_steps": 2, "warmup_max_norm": 15.0},
        sweep=("relative", (1.0, 1.05, 2.0)),
    ),
    Entry(
        "spike_clip",
        optax_stab.spike_clip,
        {"threshold": 2.0, "decay": 0.9, "warmup_steps": 1},
        sweep=("threshold", (1.0, 2.0, 50.0)),
    ),
    # ---------------------------------------------------------------- _amplify
    Entry(
        "sign_power",
        optax_stab.sign_power,
        {"power": 0.5, "threshold": 1.0},
        sweep=("power", (0.0, 0.5, 1.0)),
        descent=AMPLIFIED,
    ),
    Entry(
        "sign_sqrt_amplification",
        optax_stab.sign_sqrt_amplification,
        {"threshold": 0.5},
        sweep=("threshold", (0.1, 1.0, 3.0)),
        descent=AMPLIFIED,
    ),
    # ------------------------------------------------------------- _constraints
    Entry(
        "clip_weights",
        optax_stab.clip_weights,
        {"max_abs": 0.5},
        sweep=("max_abs", (0.1, 0.5, 2.0)),
    ),
    Entry(
        "add_l1_penalty",
        optax_stab.add_l1_penalty,
        {"strength": 0.1},
        sweep=("strength", (0.0, 0.1, 1.0)),
        descent=PENALISED,
    ),
    # _schedules: the schedule, run as optax.scale_by_schedule.
    Entry(
        "inverse_sqrt_decay",
        lambda init_value, alpha, total_steps: optax.with_extra_args_support(
            optax.scale_by_schedule(
                optax_stab.inverse_sqrt_decay(init_value, alpha, total_steps)
            )
        ),
        {"init_value": 0.5, "alpha": 2.0, "total_steps": 3},
        sweep=("alpha", (0.0, 2.0, 10.0)),
        descent=SCHEDULED,
    ),
    # ---------------------------------------------------------------- _guards
    Entry(
        "guard_nonfinite",
        optax_stab.guard_nonfinite,
        {"inner": GUARD_INNER, "max_consecutive": 2},
        descent=GUARDED,
        reads_loss=True,
    ),
    Entry(
        "spike_guard_skip",
        optax_stab.spike_guard,
        {"inner": GUARD_INNER, "window": 4, "z_threshold": 2.0, "warmup_steps": 2},
        static_args=("window",),
        sweep=("z_threshold", (1.0, 2.0, 6.0)),
        descent=GUARDED,
        reads_loss=True,
    ),
    Entry(
        "spike_guard_rescale",
        optax_stab.spike_guard,
        {
            "inner": GUARD_INNER,
            "window": 3,
            "z_threshold": 1.0,
            "warmup_steps": 2,
            "action": "rescale",
        },
        static_args=("window",),
        sweep=("z_threshold", (0.5, 1.0, 6.0)),
        descent=GUARDED,
        reads_loss=True,
    ),
    Entry(
        "spike_guard_reset",
        optax_stab.spike_guard,
        {
            "inner": GUARD_INNER,
            "window": 3,
            "z_threshold": 1.0,
            "warmup_steps": 1,
            "action": "reset",
            "max_consecutive": 1,
        },
        static_args=("window",),
        sweep=("z_threshold", (0.5, 6.0)),
        descent=GUARDED,
        reads_loss=True,
    ),
    # A guard forwards ``loss=`` to the transform it wraps.
    Entry(
        "guard_nonfinite_of_spike_guard",
        _guard_of_spike_guard,
        {},
        descent=GUARDED._replace(like=None),
        reads_loss=True,
    ),
    # ---------------------------------------------------------------- _stabilize
    Entry(
        "stabilize",
        optax_stab.stabilize,
        {"inner": GUARD_INNER, "max_norm": 1.0},
        sweep=("max_norm", (0.05, 1.0, 10.0)),
        descent=GUARDED._replace(like=None),
        reads_loss=True,
    ),
    # ---------------------------------------------------------------- _health
    Entry(
        "health_monitor",
        optax_stab.health_monitor,
        {"decay": 0.9},
        sweep=("decay", (0.0, 0.5, 0.99)),
        descent=SCALED._replace(like=optax.identity()),
    ),
]

EXCLUDED: dict[str, str] = {
    "health_report": "a host-side reader of optimizer states returning a dict of "
    "floats, not a transform (tests/test_health.py)",
    "inverse_sqrt_decay": "a schedule (step -> scale), not a transform; the "
    "'inverse_sqrt_decay' entry runs it through optax.scale_by_schedule",
}
"""Public callables of ``optax_stab.__all__`` that no entry builds, and why.

``<Factory>State`` classes need no reason: each must be the state (or part of
it) of some entry instead.
"""
