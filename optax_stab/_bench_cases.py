"""What ``optax-stab bench`` times: the cases, their optax twins and targets.

A case is one jitted training-loop step whose carried buffers (optimizer
state, the previous updates or params) are donated and fed back, so every
step after the first writes in place as in a real loop. Ideal bytes count
what a perfect kernel must read and write per step, in units of ``P``, the
bytes of the parameters (``n`` float32 elements).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_stab
from optax_stab import _median, _ring

STREAM = "stream x = 0.5*x + 0.5"
LEAF_STREAM = "the same stream, leaf by leaf"
EMA = "optax.ema(0.9)"
ADAM = "optax.adam + apply"
CLIP_ADAM = "clip_by_norm,adam + apply"
GLOBAL_CLIP = "optax.clip_by_global_norm(1)"
JNP_MEDIAN = "jnp.median, ring of 9"
NETWORK = "median network, ring of 9"


def region_analysis() -> dict[str, bool]:
    """The compiler option with which XLA elides copies of donated state.

    XLA:CPU otherwise copies donated state when a step reads the old state after
    writing the new in place (the guards' select, ``spike_clip``'s clip;
    docs/benchmarks.md). The option is per backend:
    ``xla_cpu_copy_insertion_use_region_analysis`` on CPU,
    ``xla_gpu_copy_insertion_use_region_analysis`` on GPU (where the guards
    were measured with no copies either way), none elsewhere.
    """
    backend = jax.default_backend()
    if backend == "cpu":
        return {"xla_cpu_copy_insertion_use_region_analysis": True}
    if backend in ("gpu", "cuda", "rocm"):
        return {"xla_gpu_copy_insertion_use_region_analysis": True}
    return {}  # no such option elsewhere: the [RA] rows repeat the plain ones


def default_pipeline() -> dict[str, bool]:
    """Compiler options that pin XLA's default kernel emitters for this backend.

    The compile table and the HLO counts describe what a user's program
    compiles to. The test suite turns XLA:CPU's fusion emitters off
    (``tests/conftest.py``), which halves the compile time of its many small
    programs but compiled 1024 leaves of 1K 2.5-5x slower than the default
    (docs/benchmarks.md, "The suite's compile flags"), and makes other
    kernels; these options give every measured compile the default back,
    whatever ``XLA_FLAGS`` says. None off CPU, nor on a jaxlib before 0.10
    (where the suite leaves the flag alone).
    """
    jaxlib = tuple(int(v) for v in re.findall(r"\d+", jax.lib.__version__)[:2])
    if jax.default_backend() == "cpu" and jaxlib >= (0, 10):
        return {"xla_cpu_use_fusion_emitters": True}
    return {}  # an older jaxlib may lack the option; the suite then keeps them on


RA = " [RA]"
# Cases timed a second time compiled with region_analysis() (name + RA, twin +
# RA); the first four are the twins of the others.
RA_CASES = (
    EMA,
    ADAM,
    "spike_clip()",
    "guard_nonfinite(adam) + apply",
    "spike_guard(adam) + apply",
    "spike_guard(zscore_clip,adam) + apply",
)
# (numerator, denominator or "roofline", low, high): the ratio must lie in
# [low, high]. "~" targets (moving_average(5) ~ moving_average(9)) use +-20%.
TARGETS = (
    ("ema_smoothing(0.9)", EMA, 0.0, 1.1),
    ("spike_clip()", EMA, 0.0, 1.2),
    ("moving_average(9)", "windowed_median(9)", 0.0, 0.6),
    ("moving_average(5)", "moving_average(9)", 0.8, 1.25),
    ("windowed_median(9)", "roofline", 0.0, 1.6),
    ("guard_nonfinite(adam) + apply", ADAM, 0.0, 1.2),
    ("spike_guard(adam) + apply", ADAM, 0.0, 1.2),
    ("spike_clip()" + RA, EMA + RA, 0.0, 1.2),
    ("guard_nonfinite(adam) + apply" + RA, ADAM + RA, 0.0, 1.2),
    ("spike_guard(adam) + apply" + RA, ADAM + RA, 0.0, 1.2),
    ("health,clip_by_norm,adam + apply", CLIP_ADAM, 0.0, 1.25),
    ("health,adam + apply", ADAM, 0.0, 1.25),
)
NOTES = (
    "ideal bytes per step (P = bytes of the params): stream 2P (also leaf by leaf);",
    "  ema, spike_clip 4P (read g, m; write m, u); sign_sqrt 2P (read g, write u);",
    "  clippers 3P (a norm pass, then read g, write u);",
    "  moving_average 6P for every W, the running-sum ideal (read g, sum, oldest",
    "    slot; write slot, sum, u); windowed_median (W+3)P; median of 9: 10P;",
    "  adam + apply 7P (read g, mu, nu, p; write mu, nu, p); a guard, health or",
    "    clip around it 8P (one more read of g for the tree-wide decision).",
    "[RA]: the same step compiled with compiler_options=region_analysis(),",
    "  {'xla_<cpu|gpu>_copy_insertion_use_region_analysis': True} for the",
    "  backend: XLA then orders the reads of the old state before the in-place",
    "  writes instead of copying the donated state (docs/benchmarks.md, Copies).",
)


@dataclasses.dataclass
class Case:
    """One timed step.

    Attributes:
        name: Row label.
        step: ``carry -> carry``; jitted, the carry donated.
        carry: The buffers fed back each step.
        ideal_bytes: Bytes an ideal kernel reads and writes per step.
        twin: Name of the case it is compared with, or None.
        lower: ``carry -> jax.stages.Lowered`` of the jitted step, or None.
        build_s: Seconds to trace, compile and run the first step.
        donated: Whether the first step consumed (donated) every carried
            array; scalars are not checked (XLA may keep a few).
        hlo_bytes: Bytes the compiled step reads and writes by XLA's cost
            model (``cost_analysis()["bytes accessed"]``), or None. The model
            counts a conditional's costliest branch: for a norm, its rarely
            taken rescue pass.
    """

    name: str
    step: Callable[[Any], Any]
    carry: Any
    ideal_bytes: int
    twin: str | None = None
    lower: Callable[[Any], Any] | None = None
    build_s: float = 0.0
    donated: bool = False
    hlo_bytes: float | None = None

    def build(self) -> Case:
        """Compiles and runs the first step (untimed); checks the donation."""
        t0 = time.perf_counter()
        if self.lower is not None:  # compiles the step that runs below
            self.hlo_bytes = bytes_accessed(self.lower(self.carry).compile())
        old = jax.tree.leaves(self.carry)
        self.carry = jax.block_until_ready(self.step(self.carry))
        self.build_s = time.perf_counter() - t0
        self.donated = all(x.is_deleted() for x in old if x.ndim)
        return self

    def run(self) -> float:
        """One step; returns its wall time in seconds."""
        t0 = time.perf_counter()
        self.carry = jax.block_until_ready(self.step(self.carry))
        return time.perf_counter() - t0


def bytes_accessed(compiled) -> float | None:
    """XLA's count of the bytes a compiled program reads and writes, or None."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # one entry per program in older jax
        cost = cost[0] if cost else None
    value = (cost or {}).get("bytes accessed")
    return None if value is None else float(value)


def _fresh(tree: Any) -> Any:
    # Distinct buffers: init states may share one array between fields, and
    # one buffer cannot be donated twice.
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def split(n: int, leaves: int, seed: int) -> tuple[list, list]:
    """Zero params and normal gradients: ``n`` float32 in ``leaves`` leaves."""
    sizes = [n // leaves + (i < n % leaves) for i in range(leaves)]
    rng = np.random.default_rng(seed)
    grads = [jnp.asarray(rng.standard_normal(s, np.float32)) for s in sizes]
    return [jnp.zeros(s, jnp.float32) for s in sizes], grads


def stream_case(n: int) -> Case:
    """The roofline kernel: a donated in-place read-one, write-one stream."""
    f = jax.jit(lambda x: 0.5 * x + 0.5, donate_argnums=0)
    return Case(STREAM, f, jnp.ones((n,), jnp.float32), 2 * 4 * n, lower=f.lower)


def leaf_stream_case(params: list) -> Case:
    """The stream over the params' leaves: the floor of any per-leaf update."""
    f = jax.jit(lambda t: [0.5 * x + 0.5 for x in t], donate_argnums=0)
    carry = [jnp.ones_like(x) for x in params]
    ideal = 2 * sum(x.nbytes for x in params)
    return Case(LEAF_STREAM, f, carry, ideal, STREAM, lower=f.lower)


def update_case(name, tx, grads, ideal, twin=None, options=None) -> Case:
    """``tx.update`` alone; the state and the previous updates are donated.

    Donating the previous updates lets XLA write the new ones in place, as
    when the update is consumed by ``apply_updates`` in the same step.
    ``options`` are XLA compiler options (e.g. :func:`region_analysis`).
    """

    def step(g, carry):
        u, state = tx.update(g, carry[0])
        return state, u

    f = jax.jit(step, donate_argnums=1, keep_unused=True, compiler_options=options)
    carry = (_fresh(tx.init(grads)), jax.tree.map(jnp.zeros_like, grads))
    lower = functools.partial(f.lower, grads)
    return Case(name, lambda c: f(grads, c), carry, ideal, twin, lower)


def train_case(name, tx, params, grads, ideal, twin=None, options=None) -> Case:
    """``tx.update(..., loss=)`` then ``apply_updates``; params and state donated."""

    def step(g, carry, loss):
        p, state = carry
        u, state = tx.update(g, state, p, loss=loss)
        return optax.apply_updates(p, u), state

    f = jax.jit(step, donate_argnums=1, compiler_options=options)
    loss = jnp.float32(1.0)
    carry = _fresh((params, tx.init(params)))
    return Case(
        name,
        lambda c: f(grads, c, loss),
        carry,
        ideal,
        twin,
        lambda c: f.lower(grads, c, loss),
    )


def _median_cases(params, grads, p_bytes) -> tuple[Case, Case]:
    ring = _ring.init(params, 9)
    for i in range(9):
        ring = _ring.push(ring, jax.tree.map(lambda g, i=i: g * (1 + 0.1 * i), grads))

    def case(name, fn, twin):
        f = jax.jit(lambda r, out: fn(r), donate_argnums=1, keep_unused=True)
        carry = jax.tree.map(jnp.zeros_like, params)
        lower = functools.partial(f.lower, ring)
        return Case(name, lambda c: f(ring, c), carry, 10 * p_bytes, twin, lower)

    def jnp_median(r):
        return jax.tree.map(lambda v: jnp.median(v, axis=0), r.values)

    return (
        case(NETWORK, lambda r: _median.ring_median(r, like=params), JNP_MEDIAN),
        case(JNP_MEDIAN, jnp_median, None),
    )


def _with_region_analysis(build, name: str, twin: str | None) -> list[Case]:
    """``build(name, twin, options)``; for RA_CASES also its region-analysis twin."""
    cases = [build(name, twin, None)]
    if name in RA_CASES:
        twin_ra = None if twin is None else twin + RA
        cases.append(build(name + RA, twin_ra, region_analysis()))
    return cases


def timing_cases(n: int, leaves: int, seed: int) -> list[Case]:
    """Every timed case, unbuilt; the stream kernel first."""
    params, grads = split(n, leaves, seed)
    p = 4 * n
    stab = optax_stab

    def adam():
        return optax.adam(1e-3)

    def upd(name, tx, ideal, twin):
        def build(name, twin, options):
            return update_case(name, tx, grads, ideal, twin, options)

        return _with_region_analysis(build, name, twin)

    def train(name, tx, twin=ADAM, ideal=8 * p):
        def build(name, twin, options):
            return train_case(name, tx, params, grads, ideal, twin, options)

        return _with_region_analysis(build, name, twin)

    groups = [
        [stream_case(n), leaf_stream_case(params)],
        upd(EMA, optax.ema(0.9), 4 * p, None),
        upd("ema_smoothing(0.9)", stab.ema_smoothing(0.9), 4 * p, EMA),
        upd("spike_clip()", stab.spike_clip(), 4 * p, EMA),
    ]
    for w in (5, 9):
        groups.append(upd(f"moving_average({w})", stab.moving_average(w), 6 * p, EMA))
        groups.append(
            upd(f"windowed_median({w})", stab.windowed_median(w), (w + 3) * p, EMA)
        )
    groups += [
        train(ADAM, adam(), twin=None, ideal=7 * p),
        train("guard_nonfinite(adam) + apply", stab.guard_nonfinite(adam())),
        train("spike_guard(adam) + apply", stab.spike_guard(adam())),
        train(
            "spike_guard(zscore_clip,adam) + apply",
            stab.spike_guard(optax.chain(stab.zscore_clip(max_norm=1.0), adam())),
        ),
        train("health,adam + apply", optax.chain(stab.health_monitor(), adam())),
        train(CLIP_ADAM, optax.chain(stab.clip_by_norm(1.0), adam()), twin=None),
        train(
            "health,clip_by_norm,adam + apply",
            optax.chain(stab.health_monitor(), stab.clip_by_norm(1.0), adam()),
            twin=CLIP_ADAM,
        ),
        upd(GLOBAL_CLIP, optax.clip_by_global_norm(1.0), 3 * p, None),
        upd("clip_by_norm(1.0)", stab.clip_by_norm(1.0), 3 * p, GLOBAL_CLIP),
        upd("zscore_clip()", stab.zscore_clip(), 3 * p, GLOBAL_CLIP),
        upd(
            "sign_sqrt_amplification()",
            stab.sign_sqrt_amplification(),
            2 * p,
            GLOBAL_CLIP,
        ),
        list(_median_cases(params, grads, p)),
    ]
    return [case for group in groups for case in group]


def _adam():
    return optax.adam(1e-3)


# --compile: (name, factory, twin name); twins are built by COMPILE_TWINS.
COMPILE_TWINS = {
    EMA: lambda: optax.ema(0.9),
    "optax.clip_by_global_norm(1)": lambda: optax.clip_by_global_norm(1.0),
    "optax.adam(1e-3)": _adam,
}
COMPILE_CASES = (
    ("ema_smoothing(0.9)", lambda: optax_stab.ema_smoothing(0.9), EMA),
    ("moving_average(5)", lambda: optax_stab.moving_average(5), EMA),
    ("gaussian_smoothing()", optax_stab.gaussian_smoothing, EMA),
    ("spike_clip()", optax_stab.spike_clip, EMA),
    ("clip_by_norm(1.0)", lambda: optax_stab.clip_by_norm(1.0), GLOBAL_CLIP),
    ("zscore_clip()", optax_stab.zscore_clip, GLOBAL_CLIP),
    ("autoclip()", optax_stab.autoclip, GLOBAL_CLIP),
    ("adaptive_tensor_clip()", optax_stab.adaptive_tensor_clip, GLOBAL_CLIP),
    ("health_monitor()", optax_stab.health_monitor, GLOBAL_CLIP),
    ("windowed_median(5)", lambda: optax_stab.windowed_median(5), "optax.adam(1e-3)"),
    (
        "guard_nonfinite(adam)",
        lambda: optax_stab.guard_nonfinite(_adam()),
        "optax.adam(1e-3)",
    ),
    ("spike_guard(adam)", lambda: optax_stab.spike_guard(_adam()), "optax.adam(1e-3)"),
)


def _lowered(tx, leaves: int, leaf_size: int):
    """``jax.jit(tx.update)`` lowered on ``leaves`` abstract leaves.

    The update gets params and ``loss=jnp.float32(1.0)``, as in a guarded
    training loop; shapes are abstract, so nothing runs.
    """
    tx = optax.with_extra_args_support(tx)
    params = [jax.ShapeDtypeStruct((leaf_size,), jnp.float32)] * leaves
    state = jax.eval_shape(tx.init, params)
    return jax.jit(tx.update).lower(params, state, params, loss=jnp.float32(1.0))


def compile_seconds(tx, leaves: int, leaf_size: int = 1024) -> float:
    """Seconds to lower and compile ``jax.jit(tx.update)`` on ``leaves`` leaves.

    Compiled with :func:`default_pipeline`.
    """
    t0 = time.perf_counter()
    _lowered(tx, leaves, leaf_size).compile(default_pipeline())
    return time.perf_counter() - t0


_KERNEL_OPS = ("fusion", "copy", "conditional")


def _canonical(body: str) -> str:
    """A computation's text without its instruction names and metadata."""
    body = re.sub(r", metadata=\{[^}]*\}", "", body)
    names: dict[str, str] = {}
    return re.sub(
        r"%([\w.\-]+)", lambda m: names.setdefault(m[1], f"%v{len(names)}"), body
    )


def hlo_counts(tx, leaves: int, leaf_size: int = 1024) -> dict[str, int]:
    """What XLA compiles for ``jax.jit(tx.update)`` on ``leaves`` leaves.

    - ``ops``: instructions of the HLO handed to XLA (before optimisation):
      XLA:CPU's passes cost time per instruction, for every leaf;
    - ``kernels``: fusions, copies and conditionals of the optimised
      program (a conditional's branches included), each compiled on its own;
    - ``distinct``: how many of the fused computations differ (XLA:CPU
      compiles a kernel once for all identical fusions; a leaf-specific
      constant, a slice ``v[i]`` of a vector, makes one per leaf).
    """
    lowered = _lowered(tx, leaves, leaf_size)
    ops = len(re.findall(r"^\s+(?:ROOT )?\S+ = ", lowered.as_text("hlo"), re.M))
    text = lowered.compile(default_pipeline()).as_text()
    kernels = sum(
        1 for line in text.splitlines() if any(f" {op}(" in line for op in _KERNEL_OPS)
    )
    bodies = {
        name: re.sub(r"[\w.]+: ", "", params) + _canonical(body)
        for name, params, body in re.findall(
            r"^(%[\w.\-]+) \(([^)]*)\) -> [^{]*\{\n(.*?)\n\}", text, re.M | re.S
        )
    }
    called = re.findall(r" fusion\(.*?calls=(%[\w.\-]+)", text)
    distinct = len({bodies[c] for c in called if c in bodies})
    return {"ops": ops, "kernels": kernels, "distinct": distinct}


def per_leaf_counts(tx, small: int = 8, large: int = 24) -> dict[str, float]:
    """:func:`hlo_counts` per leaf: the difference from ``small`` to ``large``
    leaves over ``large - small`` (the constant part cancels)."""
    a, b = (hlo_counts(tx, n) for n in (small, large))
    return {k: (b[k] - a[k]) / (large - small) for k in a}
