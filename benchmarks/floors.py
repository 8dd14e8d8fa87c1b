"""Floors: each algorithm written bare, against its optax twin and ours.

Issue 8 asks each transform to compile in at most 2x its optax twin's time on
1024 leaves, and a few to step at the twin's speed. Where ours misses, is it
the algorithm or what the library adds to it (a non-finite step passed
through and not stored, the warm-up, the count of clipped coordinates, drift
control, the rescue of overflowed norms)? This script answers it by
measurement: it writes each algorithm as the shortest plain-JAX optax
transform that computes it (no skip, no counts, no warm-up, no rescue: not
something to use, it is poisoned for good by one NaN) and compiles and times
it next to the twin and next to ours, in one process.

    python benchmarks/floors.py            # compile at 256 and 1024 leaves,
                                           # then steps at 8M float32 in 16 leaves
    python benchmarks/floors.py --quick    # 64 leaves, 1M float32, 5 rounds

The figures are in docs/benchmarks.md, "Floors".
"""

from __future__ import annotations

import argparse
import random
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import optax_stab
from optax_stab import _bench, _bench_cases, _median, _ring, _tree


def _tx(init, update):
    return optax.GradientTransformationExtraArgs(init, update)


def _count(step, window):
    """min(step + 1, window) as float32: the number of filled slots."""
    return jnp.minimum(step + 1, window).astype(jnp.float32)


def _ring_init(params, window):
    return jax.tree.map(lambda p: jnp.zeros((window, *p.shape), p.dtype), params)


def _push(ring, g, slot):
    return jax.tree.map(
        lambda r, x: lax.dynamic_update_index_in_dim(r, x, slot, 0), ring, g
    )


def moving_average_floor(window: int):
    """Ring, one running sum of the slots that stay, mean from the new sum."""

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return _ring_init(params, window), zeros, jnp.zeros([], jnp.int32)

    def update(g, state, params=None, **extra):
        ring, total, step = state
        slot = step % window
        ring = _push(ring, g, slot)
        nxt = (slot + 1) % window
        leaving = jax.tree.map(
            lambda r: lax.dynamic_index_in_dim(r, nxt, keepdims=False), ring
        )
        total = jax.tree.map(lambda t, x, o: t + x - o, total, g, leaving)
        n = _count(step, window)
        out = jax.tree.map(lambda t, o: (t + o) / n, total, leaving)
        return out, (ring, total, step + 1)

    return _tx(init, update)


def moving_average_recompute(window: int):
    """Not a floor: a design tried for ``moving_average``, kept here measured.

    The library's skip of non-finite steps, with the running sum recomputed
    exactly from the ring under ``lax.cond`` once per pass over it (the drift
    control), instead of ``moving_average``'s second running sum.
    """

    def init(params):
        total = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
        return _ring.init(params, window), total

    def update(g, state, params=None, **extra):
        ring, total = state
        finite = _tree.all_finite(g)
        complete = finite & (ring.index == window - 1)
        count = jnp.minimum(ring.filled + 1, window).astype(jnp.float32)
        ring = _ring.push(ring, g, where=finite)
        leaving = _ring.next_slot(ring)

        def recompute(values, total, g, leaving):
            # After the push that completes a pass, slot 0 leaves next.
            return jax.tree.map(lambda r: sum(r[s] for s in range(1, window)), values)

        def running(values, total, g, leaving):
            return jax.tree.map(
                lambda t, x, o: jnp.where(finite, t + x - o, t), total, g, leaving
            )

        total = lax.cond(complete, recompute, running, ring.values, total, g, leaving)
        means = jax.tree.map(lambda t, o: (t + o) / count, total, leaving)
        return optax.tree.where(finite, means, g), (ring, total)

    return _tx(init, update)


def fir_floor(lag_weights: np.ndarray):
    """Ring and a weighted sum of its slots (weights rotated to the slots)."""
    window = len(lag_weights)
    lw = jnp.asarray(lag_weights, jnp.float32)

    def init(params):
        return _ring_init(params, window), jnp.zeros([], jnp.int32)

    def update(g, state, params=None, **extra):
        ring, step = state
        slot = step % window
        ring = _push(ring, g, slot)
        lag = (slot - jnp.arange(window)) % window
        w = jnp.where(lag <= step, lw[lag], 0.0)
        w = w / jnp.sum(w)
        ws = [w[s] for s in range(window)]

        def leaf(r):
            acc = ws[0] * r[0]
            for s in range(1, window):
                acc = acc + ws[s] * r[s]
            return acc

        return jax.tree.map(leaf, ring), (ring, step + 1)

    return _tx(init, update)


def gaussian_floor():
    """``gaussian_smoothing()``'s weights: window 8, sigma 4."""
    return fir_floor(np.exp(-(np.arange(8.0) ** 2) / (2 * 4.0**2)))


def median_floor(window: int):
    """Ring and the pruned selection network to the middle wire (odd W)."""
    m = (window - 1) // 2
    network = _median.selection_network(window, (m,))

    def init(params):
        return _ring_init(params, window), jnp.zeros([], jnp.int32)

    def update(g, state, params=None, **extra):
        ring, step = state
        ring = _push(ring, g, step % window)

        def leaf(r):
            wires = [r[s] for s in range(window)]
            for a, b, need_min, need_max in network:
                lo, hi = wires[a], wires[b]
                if need_min:
                    wires[a] = jnp.minimum(lo, hi)
                if need_max:
                    wires[b] = jnp.maximum(lo, hi)
            return wires[m]

        return jax.tree.map(leaf, ring), (ring, step + 1)

    return _tx(init, update)


def spike_clip_floor(threshold: float = 5000.0, decay: float = 0.999):
    """SPAM: g^2 > theta nu -> sign(g) sqrt(theta nu); nu an EMA of clipped g^2."""

    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(g, nu, params=None, **extra):
        def leaf(x, v):
            cap2 = threshold * v
            spike = (v > 0) & (x * x > cap2)
            clipped = jnp.where(spike, jnp.sign(x) * jnp.sqrt(cap2), x)
            return clipped, decay * v + (1 - decay) * jnp.where(spike, cap2, x * x)

        return _tree.map_unzip(leaf, g, nu, n=2)

    return _tx(init, update)


def adaptive_tensor_clip_floor(decay: float = 0.98, relative: float = 1.05):
    """AdaGC after warm-up: each leaf at ``relative`` x the EMA of its clipped norms."""

    def init(params):
        return jax.tree.map(lambda _: jnp.ones([], jnp.float32), params)

    def update(g, gamma, params=None, **extra):
        def leaf(x, c):
            n = jnp.sqrt(jnp.sum(x * x))
            limit = relative * c
            h = jnp.where(n > limit, limit / n, 1.0)
            return x * h, decay * c + (1 - decay) * n * h

        return _tree.map_unzip(leaf, g, gamma, n=2)

    return _tx(init, update)


EMA, CLIP, ADAM = "optax.ema(0.9)", "optax.clip_by_global_norm(1)", "optax.adam(1e-3)"
TWINS = {
    EMA: lambda: optax.ema(0.9),
    CLIP: lambda: optax.clip_by_global_norm(1.0),
    ADAM: lambda: optax.adam(1e-3),
}
# (ours, its floor, the twin)
COMPILE_ROWS = (
    (
        "moving_average(5)",
        lambda: optax_stab.moving_average(5),
        lambda: moving_average_floor(5),
        EMA,
    ),
    (
        "gaussian_smoothing()",
        optax_stab.gaussian_smoothing,
        gaussian_floor,
        EMA,
    ),
    (
        "windowed_median(5)",
        lambda: optax_stab.windowed_median(5),
        lambda: median_floor(5),
        ADAM,
    ),
    ("spike_clip()", optax_stab.spike_clip, spike_clip_floor, EMA),
    (
        "adaptive_tensor_clip()",
        optax_stab.adaptive_tensor_clip,
        adaptive_tensor_clip_floor,
        CLIP,
    ),
)


def check_floors(steps: int = 12) -> None:
    """Each floor computes what ours does on finite gradients (after warm-up).

    Not checked: the AdaGC floor, whose gamma starts at 1 where ours runs
    its warm-up first.
    """
    rng = np.random.default_rng(0)
    grads = [
        {"a": jnp.asarray(rng.standard_normal(6), jnp.float32) * (1 + 9 * (t == 7))}
        for t in range(steps)
    ]
    pairs = (
        (optax_stab.moving_average(5), moving_average_floor(5), 0),
        (optax_stab.moving_average(5), moving_average_recompute(5), 0),
        (optax_stab.gaussian_smoothing(), gaussian_floor(), 0),
        (optax_stab.windowed_median(5), median_floor(5), 4),
        (optax_stab.spike_clip(warmup_steps=0), spike_clip_floor(), 0),
    )
    for ours, floor, skip in pairs:
        s1, s2 = ours.init(grads[0]), floor.init(grads[0])
        for t, g in enumerate(grads):
            u1, s1 = ours.update(g, s1)
            u2, s2 = floor.update(g, s2)
            if t >= skip:
                np.testing.assert_allclose(u1["a"], u2["a"], rtol=1e-4, atol=1e-6)
    print(f"floors match ours on {steps} finite steps (after the median's warm-up)")


def compile_floors(leaf_counts) -> None:
    """Lower + compile seconds of ours, the floor and the twin; per-leaf ops."""
    secs = _bench_cases.compile_seconds
    twins = {
        name: {n: secs(make(), n) for n in leaf_counts} for name, make in TWINS.items()
    }
    big = leaf_counts[-1]
    print(f"lower + compile seconds on {big} leaves of 1024 float32 (x the twin);")
    print("per leaf: ops handed to XLA, kernels (HLO at 8 and 24 leaves)")
    print(
        f"{'algorithm':24s} {'twin':18s} {'twin s':>7s} {'floor s':>8s} {'x':>5s}"
        f" {'ours s':>7s} {'x':>5s}   {'ops floor/ours/twin':>20s}"
        f" {'kernels floor/ours/twin':>24s}"
    )
    for name, ours, floor, twin in COMPILE_ROWS:
        t = twins[twin][big]
        f, o = secs(floor(), big), secs(ours(), big)
        counts = [
            _bench_cases.per_leaf_counts(make()) for make in (floor, ours, TWINS[twin])
        ]
        ops = "/".join(f"{c['ops']:.0f}" for c in counts)
        kernels = "/".join(f"{c['kernels']:.1f}" for c in counts)
        print(
            f"{name:24s} {twin:18s} {t:7.2f} {f:8.2f} {f / t:5.2f} {o:7.2f}"
            f" {o / t:5.2f}   {ops:>20s} {kernels:>24s}"
        )
        sys.stdout.flush()


def step_floors(n: int, leaves: int, repeats: int, seed: int) -> None:
    """Interleaved donated steps: ours, the floor, the twin; paired ratios."""
    _, grads = _bench_cases.split(n, leaves, seed)
    p = 4 * n

    def upd(name, tx):
        return _bench_cases.update_case(name, tx, grads, 0)

    cases = [
        _bench_cases.stream_case(n),
        upd(EMA, optax.ema(0.9)),
        upd("spike_clip()", optax_stab.spike_clip()),
        upd("spike_clip floor", spike_clip_floor()),
        upd("moving_average(9)", optax_stab.moving_average(9)),
        upd("moving_average(9) floor", moving_average_floor(9)),
        upd("moving_average(9) cond", moving_average_recompute(9)),
        upd("windowed_median(9)", optax_stab.windowed_median(9)),
        upd("windowed_median(9) floor", median_floor(9)),
    ]
    for case in cases:
        case.build()
    times = {case.name: [] for case in cases}
    rng = random.Random(seed)
    for _ in range(repeats):
        order = list(cases)
        rng.shuffle(order)
        for case in order:
            times[case.name].append(case.run())
    times = {k: np.asarray(v) for k, v in times.items()}
    print(f"\nsteps: {n} float32 in {leaves} leaves, {repeats} rounds, medians [IQR]")
    print(f"{'case':26s} {'ms/step':>8s} {'HLO P':>6s} {'copies':>6s}")
    for case in cases:
        hlo = case.hlo_bytes / p if case.hlo_bytes else float("nan")
        copies = case.lower(case.carry).compile().as_text().count(" copy(")
        ms = np.median(times[case.name]) * 1e3
        print(f"{case.name:26s} {ms:8.2f} {hlo:6.1f} {copies:6d}")
    print(f"\n{'ratio (paired per round)':52s} {'median':>6s}  [IQR]")
    for a, b in (
        ("spike_clip()", EMA),
        ("spike_clip floor", EMA),
        ("moving_average(9)", "windowed_median(9)"),
        ("moving_average(9) floor", "windowed_median(9)"),
        ("moving_average(9) floor", "windowed_median(9) floor"),
        ("moving_average(9) cond", "windowed_median(9)"),
    ):
        med, q1, q3 = _bench._quartiles(times[a] / times[b])
        print(f"{a + ' / ' + b:52s} {med:6.2f}  [{q1:.2f}, {q3:.2f}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(_bench.machine())
    check_floors()
    if args.quick:
        compile_floors((16, 64))
        step_floors(1 << 20, 16, 5, 0)
    else:
        compile_floors((256, 1024))
        step_floors(8 << 20, 16, 15, 0)


if __name__ == "__main__":
    main()
