"""Every public transform, with small hyperparameters, for the invariant suite.

Add one ``Entry`` per public factory (in the section of its module). The suite
in ``test_invariants.py`` runs each entry through jit, vmap, pmap, scan,
sharding, chain, MultiSteps, inject_hyperparams, masking, dtypes and
non-finite inputs. Never special-case a transform in the suite: describe it
here instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import optax

import optax_stab


class Entry(NamedTuple):
    """How to build one transform for the invariant suite.

    Attributes:
        name: Test id.
        factory: The public factory.
        kwargs: Small, fast hyperparameters (windows <= 5, warm-ups <= 3).
        static_args: Arguments ``optax.inject_hyperparams`` must keep static
            (window lengths and other structural ints).
        sweep: ``(name, values)`` of a numeric hyperparameter that
            ``inject_hyperparams`` + ``vmap`` sweeps; ``None`` if it has none.
    """

    name: str
    factory: Callable[..., optax.GradientTransformation]
    kwargs: dict[str, Any]
    static_args: tuple[str, ...] = ()
    sweep: tuple[str, tuple[float, ...]] | None = None

    def make(self, **overrides: Any) -> optax.GradientTransformationExtraArgs:
        return self.factory(**{**self.kwargs, **overrides})


ENTRIES: list[Entry] = [
    # ---------------------------------------------------------------- _smoothing
    Entry(
        "ema_smoothing",
        optax_stab.ema_smoothing,
        {"decay": 0.8},
        sweep=("decay", (0.0, 0.5, 0.9)),
    ),
    Entry(
        "ema_smoothing_bf16_acc",
        optax_stab.ema_smoothing,
        {"decay": 0.8, "accumulator_dtype": jnp.bfloat16},
    ),
    Entry(
        "moving_average",
        optax_stab.moving_average,
        {"window": 3},
        static_args=("window",),
    ),
    Entry(
        "gaussian_smoothing",
        optax_stab.gaussian_smoothing,
        {"window": 4, "sigma": 1.5},
        static_args=("window",),
        sweep=("sigma", (0.5, 1.0, 3.0)),
    ),
    Entry("fir_smoothing", optax_stab.fir_smoothing, {"weights": (3.0, 2.0, 1.0)}),
    Entry(
        "windowed_median",
        optax_stab.windowed_median,
        {"window": 4},
        static_args=("window",),
    ),
    Entry(
        "windowed_median_bf16_acc",
        optax_stab.windowed_median,
        {"window": 5, "accumulator_dtype": jnp.bfloat16},
        static_args=("window",),
    ),
    Entry(
        "amplify_slow",
        optax_stab.amplify_slow,
        {"strength": 2.0},
        sweep=("strength", (0.0, 1.0, 5.0)),
    ),
    Entry(
        "amplify_slow_median",
        optax_stab.amplify_slow,
        {"strength": 1.0, "filter": optax_stab.windowed_median(3)},
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
    ),
    Entry(
        "sign_sqrt_amplification",
        optax_stab.sign_sqrt_amplification,
        {"threshold": 0.5},
        sweep=("threshold", (0.1, 1.0, 3.0)),
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
    ),
    # ---------------------------------------------------------------- _guards
    Entry(
        "guard_nonfinite",
        optax_stab.guard_nonfinite,
        {"inner": optax.sgd(0.1, momentum=0.9), "max_consecutive": 2},
    ),
    Entry(
        "spike_guard_skip",
        optax_stab.spike_guard,
        {
            "inner": optax.sgd(0.1, momentum=0.9),
            "window": 4,
            "z_threshold": 2.0,
            "warmup_steps": 2,
        },
        static_args=("window",),
        sweep=("z_threshold", (1.0, 2.0, 6.0)),
    ),
    Entry(
        "spike_guard_rescale",
        optax_stab.spike_guard,
        {
            "inner": optax.sgd(0.1, momentum=0.9),
            "window": 3,
            "z_threshold": 1.0,
            "warmup_steps": 2,
            "action": "rescale",
        },
        static_args=("window",),
        sweep=("z_threshold", (0.5, 1.0, 6.0)),
    ),
    Entry(
        "spike_guard_reset",
        optax_stab.spike_guard,
        {
            "inner": optax.sgd(0.1, momentum=0.9),
            "window": 3,
            "z_threshold": 1.0,
            "warmup_steps": 1,
            "action": "reset",
            "max_consecutive": 1,
        },
        static_args=("window",),
    ),
    # ---------------------------------------------------------------- _health
    Entry(
        "health_monitor",
        optax_stab.health_monitor,
        {"decay": 0.9},
        sweep=("decay", (0.0, 0.5, 0.99)),
    ),
]
