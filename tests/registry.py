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
    # ---------------------------------------------------------------- _amplify
    # ------------------------------------------------------------- _constraints
    # ---------------------------------------------------------------- _guards
    # ---------------------------------------------------------------- _health
]
