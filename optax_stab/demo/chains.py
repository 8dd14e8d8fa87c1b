"""The optimizer chains the demo compares, resolved lazily from ``optax_stab``.

Each chain is "stabiliser, then the task's base optimizer", so every row of the
results table differs from ``plain`` by exactly what its name says. Names from
``optax_stab`` are looked up when a chain is built, not at import, so the demo
runs with whatever transforms the installed version provides.

The recommended combination is
``spike_guard(chain(zscore_clip(max_norm=c), base), action="skip")``:

* ``zscore_clip`` (ZClip) learns the typical gradient norm of *this* run from an
  EMA of its mean and variance, and clips norms more than 2.5 standard
  deviations above it, so a spike is cut back to the run's own level, far
  below any fixed threshold. Its ``max_norm`` cap (the same ``c`` as the
  plain norm-clipping chains) bounds what an adaptive threshold alone cannot:
  a slow exponential blow-up, whose norm statistics grow along with it.
* ``spike_guard`` around it catches what clipping cannot: a loss or norm spike
  more than 6 sigmas above the last 128 steps, or any NaN/Inf, skips the step
  and leaves the inner state (momentum, clip statistics) untouched, so one bad
  batch cannot poison the optimizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import optax

import optax_stab
from optax_stab.demo import tasks as tasks_lib


def _get(name: str) -> Callable[..., optax.GradientTransformation]:
    return getattr(optax_stab, name)


@dataclasses.dataclass(frozen=True)
class Chain:
    """One compared optimizer chain.

    Attributes:
        name: Command-line name.
        needs: ``optax_stab`` attributes the chain uses.
        describe: ``task -> str``: the chain as code, with its hyperparameters.
        wrap: ``(task, base) -> transform`` around the task's base optimizer.
    """

    name: str
    needs: tuple[str, ...]
    describe: Callable[[tasks_lib.Task], str]
    wrap: Callable[
        [tasks_lib.Task, optax.GradientTransformation], optax.GradientTransformation
    ]

    def available(self) -> bool:
        """Whether the installed ``optax_stab`` provides every name in ``needs``."""
        return all(hasattr(optax_stab, n) for n in self.needs)

    def build(self, task: tasks_lib.Task, lr: float) -> optax.GradientTransformation:
        """The chain around ``task``'s base optimizer at learning rate ``lr``."""
        return self.wrap(task, task.make_optimizer(lr))


def _pre(expr: Callable[[tasks_lib.Task], str], make) -> tuple:
    """A stabiliser in front of the base optimizer: ``chain(stab, base)``."""
    return (
        lambda t: f"chain({expr(t)}, {t.optimizer})",
        lambda t, base: optax.chain(make(t), base),
    )


def _chain(name, needs, describe_and_wrap) -> Chain:
    describe, wrap = describe_and_wrap
    return Chain(name, needs, describe, wrap)


CHAINS: tuple[Chain, ...] = (
    _chain("plain", (), (lambda t: t.optimizer, lambda t, base: base)),
    _chain(
        "clip_global_norm",
        (),
        _pre(
            lambda t: f"optax.clip_by_global_norm({t.clip_norm:g})",
            lambda t: optax.clip_by_global_norm(t.clip_norm),
        ),
    ),
    _chain(
        "ema_smoothing",
        ("ema_smoothing",),
        _pre(lambda t: "ema_smoothing(0.9)", lambda t: _get("ema_smoothing")(0.9)),
    ),
    _chain(
        "windowed_median",
        ("windowed_median",),
        _pre(lambda t: "windowed_median(5)", lambda t: _get("windowed_median")(5)),
    ),
    _chain(
        "clip_by_norm",
        ("clip_by_norm",),
        _pre(
            lambda t: f"clip_by_norm({t.clip_norm:g}, scope='leaf')",
            lambda t: _get("clip_by_norm")(t.clip_norm, scope="leaf"),
        ),
    ),
    _chain(
        "zscore_clip",
        ("zscore_clip",),
        _pre(lambda t: "zscore_clip()", lambda t: _get("zscore_clip")()),
    ),
    _chain(
        "autoclip",
        ("autoclip",),
        _pre(
            lambda t: "autoclip(10.0, history=1000)",
            lambda t: _get("autoclip")(10.0, history=1000),
        ),
    ),
    _chain(
        "sign_sqrt",
        ("sign_sqrt_amplification",),
        _pre(
            lambda t: f"sign_sqrt_amplification({t.sign_threshold:g})",
            lambda t: _get("sign_sqrt_amplification")(t.sign_threshold),
        ),
    ),
    _chain(
        "spike_guard",
        ("spike_guard",),
        (
            lambda t: f"spike_guard({t.optimizer})",
            lambda t, base: _get("spike_guard")(base),
        ),
    ),
    _chain(
        "guard_nonfinite",
        ("guard_nonfinite",),
        (
            lambda t: f"guard_nonfinite({t.optimizer})",
            lambda t, base: _get("guard_nonfinite")(base),
        ),
    ),
    _chain(
        "recommended",
        ("spike_guard", "zscore_clip"),
        (
            lambda t: (
                f"spike_guard(chain(zscore_clip(max_norm={t.clip_norm:g}), "
                f"{t.optimizer}))"
            ),
            lambda t, base: _get("spike_guard")(
                optax.chain(_get("zscore_clip")(max_norm=t.clip_norm), base),
                action="skip",
            ),
        ),
    ),
)

#: Chain names, in table order.
CHAIN_NAMES: tuple[str, ...] = tuple(c.name for c in CHAINS)
_BY_NAME = {c.name: c for c in CHAINS}


def get_chain(name: str) -> Chain:
    """The chain called ``name``.

    Raises:
        KeyError: If ``name`` is not in :data:`CHAIN_NAMES`.
    """
    return _BY_NAME[name]


def available_chains() -> tuple[str, ...]:
    """Names of the chains the installed ``optax_stab`` can build."""
    return tuple(c.name for c in CHAINS if c.available())
