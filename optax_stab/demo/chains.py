"""The optimizer chains the demo compares.

Each chain is "stabiliser, then the task's base optimizer", so every row of the
results table differs from ``plain`` by exactly what its name says. A chain is
data (:class:`Call` specs), so the code printed in the results is the code
that built it.

The ``recommended`` row is ``optax_stab.stabilize(base, max_norm=c)``, with
its defaults ``spike_guard(chain(zscore_clip(max_norm=c), base))``:

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

import optax

import optax_stab
from optax_stab.demo import tasks as tasks_lib


@dataclasses.dataclass(frozen=True)
class TaskValue:
    """A hyperparameter that each task sets, e.g. its clip norm.

    Attributes:
        attr: Attribute of :class:`optax_stab.demo.tasks.Task`.
    """

    attr: str


@dataclasses.dataclass(frozen=True)
class Call:
    """A factory call kept as data, so one spec both builds and prints it.

    Attributes:
        name: Attribute of ``optax_stab``, or of ``optax`` when prefixed
            ``optax.``.
        args: Positional arguments (:class:`TaskValue` ones are looked up on
            the task).
        kwargs: Keyword arguments as ``(key, value)`` pairs, in print order.
    """

    name: str
    args: tuple = ()
    kwargs: tuple[tuple[str, object], ...] = ()

    def resolve(self, task: tasks_lib.Task) -> Call:
        """This call with every :class:`TaskValue` replaced by ``task``'s value."""

        def value(v):
            return getattr(task, v.attr) if isinstance(v, TaskValue) else v

        return Call(
            self.name,
            tuple(value(a) for a in self.args),
            tuple((k, value(v)) for k, v in self.kwargs),
        )

    def render(self, *inner: str) -> str:
        """The call as code; ``inner`` are leading arguments already rendered."""
        args = [*inner, *(_fmt(a) for a in self.args)]
        args += [f"{k}={_fmt(v)}" for k, v in self.kwargs]
        return f"{self.name}({', '.join(args)})"

    def build(self, *inner: optax.GradientTransformation):
        """Calls the factory, looked up now; ``inner`` are leading arguments."""
        if self.name.startswith("optax."):
            factory = getattr(optax, self.name.removeprefix("optax."))
        else:
            factory = getattr(optax_stab, self.name)
        return factory(*inner, *self.args, **dict(self.kwargs))


def _fmt(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value)


def _call(name: str, *args, **kwargs) -> Call:
    return Call(name, args, tuple(kwargs.items()))


@dataclasses.dataclass(frozen=True)
class Chain:
    """One compared optimizer chain: ``guard(chain(pre, base))``.

    Its description and its transform come from the same :class:`Call` specs,
    so the printed chain is the built one.

    Attributes:
        name: Command-line name.
        pre: Stabiliser chained in front of the task's base optimizer, or
            ``None``.
        guard: Guard wrapping the result (its first argument), or ``None``.
    """

    name: str
    pre: Call | None = None
    guard: Call | None = None

    def _calls(self, task: tasks_lib.Task) -> tuple[Call | None, Call | None]:
        return tuple(c.resolve(task) if c else None for c in (self.pre, self.guard))

    def describe(self, task: tasks_lib.Task) -> str:
        """The chain as code, with its hyperparameters."""
        pre, guard = self._calls(task)
        text = task.optimizer
        if pre is not None:
            text = f"chain({pre.render()}, {text})"
        return guard.render(text) if guard is not None else text

    def build(self, task: tasks_lib.Task, lr: float) -> optax.GradientTransformation:
        """The chain around ``task``'s base optimizer at learning rate ``lr``."""
        pre, guard = self._calls(task)
        tx = task.make_optimizer(lr)
        if pre is not None:
            tx = optax.chain(pre.build(), tx)
        return guard.build(tx) if guard is not None else tx


CLIP_NORM = TaskValue("clip_norm")
SIGN_THRESHOLD = TaskValue("sign_threshold")

CHAINS: tuple[Chain, ...] = (
    Chain("plain"),
    Chain("clip_global_norm", pre=_call("optax.clip_by_global_norm", CLIP_NORM)),
    Chain("ema_smoothing", pre=_call("ema_smoothing", 0.9)),
    Chain("windowed_median", pre=_call("windowed_median", 5)),
    Chain("clip_by_norm", pre=_call("clip_by_norm", CLIP_NORM, scope="leaf")),
    Chain("zscore_clip", pre=_call("zscore_clip")),
    Chain("autoclip", pre=_call("autoclip", 10.0, history=1000)),
    Chain("sign_sqrt", pre=_call("sign_sqrt_amplification", SIGN_THRESHOLD)),
    Chain("spike_guard", guard=_call("spike_guard")),
    Chain("guard_nonfinite", guard=_call("guard_nonfinite")),
    # optax_stab.stabilize(base) with its defaults, and the variants the
    # learning-rate sweep compared to choose them.
    Chain("recommended", guard=_call("stabilize", max_norm=CLIP_NORM)),
    Chain(
        "stabilize_global", guard=_call("stabilize", max_norm=CLIP_NORM, clip="global")
    ),
    Chain("stabilize_noclip", guard=_call("stabilize", clip="none")),
    Chain(
        "stabilize_adagc", guard=_call("stabilize", max_norm=CLIP_NORM, clip="adagc")
    ),
)

#: Chain names, in table order.
CHAIN_NAMES: tuple[str, ...] = tuple(c.name for c in CHAINS)
#: The plain demo's chains: all but the variants of ``stabilize``.
DEFAULT_CHAINS: tuple[str, ...] = tuple(
    n for n in CHAIN_NAMES if not n.startswith("stabilize_")
)
#: The sweep's chains: the baselines, the adaptive clippers, the guard and
#: ``stabilize`` with each clipper its ``clip=`` offers.
SWEEP_CHAINS: tuple[str, ...] = (
    "plain",
    "clip_global_norm",
    "zscore_clip",
    "autoclip",
    "sign_sqrt",
    "spike_guard",
    "recommended",
    "stabilize_global",
    "stabilize_noclip",
    "stabilize_adagc",
)
_BY_NAME = {c.name: c for c in CHAINS}


def get_chain(name: str) -> Chain:
    """The chain called ``name``.

    Raises:
        KeyError: If ``name`` is not in :data:`CHAIN_NAMES`.
    """
    return _BY_NAME[name]
