"""Speed of optax_stab transforms vs optax and the memory-bandwidth roofline.

Run ``optax-stab bench [--size N] [--repeats R]`` (or ``python -m benchmarks``
from the repository root).
Every figure comes from one run on this machine: the achievable bandwidth is
measured first (a fused ``a * x + b`` stream over the same number of bytes),
then each update is timed and reported as

- ``x roofline``: time / (bytes an ideal kernel must move / measured bandwidth),
- ``x optax``: time / time of the closest optax transform, where one exists,

and the windowed median is compared with ``jnp.median`` over the same ring.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import optax_stab
from optax_stab import _median, _ring


def _time(fn: Callable, *args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` in seconds, after one compile run."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bandwidth(n: int, repeats: int) -> float:
    """Achievable bytes/s of a fused read-one, write-one elementwise stream."""
    # Donated like the updates below: a fresh output buffer per call would
    # measure page faults, not bandwidth.
    f = jax.jit(lambda v: 0.5 * v + 0.5, donate_argnums=0)
    x = f(jnp.ones((n,), jnp.float32))
    nbytes = x.nbytes
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / sorted(times)[len(times) // 2]


def _update_timer(tx, params, grads, repeats):
    """Median time of one update step, the state donated as in a training loop.

    Without donation every step would copy the whole state (a ring buffer of
    ``W x params``) instead of writing one slot in place.
    """
    update = jax.jit(tx.update, donate_argnums=1)
    state = update(grads, tx.init(params))[1]  # compile; past step 1
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        u, state = update(grads, state)
        jax.block_until_ready((u, state))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags, shared with ``optax-stab bench``."""
    parser.add_argument(
        "--size", type=int, default=8 * 2**20, help="float32 elements (default 8M)"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per case (default 5)"
    )


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="optax-stab bench", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    n, r = args.size, args.repeats
    elem = 4
    bw = bandwidth(n, r)
    params = jnp.zeros((n,), jnp.float32)
    grads = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    print(f"device: {jax.devices()[0].device_kind}, {n / 2**20:.0f}M float32 elements")
    print(f"measured bandwidth: {bw / 1e9:.2f} GB/s (fused a*x+b stream)\n")

    rows = []

    def report(name, seconds, min_bytes, baseline=None):
        roof = min_bytes / bw
        row = {
            "case": name,
            "ms": 1e3 * seconds,
            "x_roofline": seconds / roof,
            "x_optax": None if baseline is None else seconds / baseline,
        }
        rows.append(row)
        vs = "" if baseline is None else f"{row['x_optax']:8.2f}"
        print(f"{name:<34} {row['ms']:9.2f} {row['x_roofline']:10.2f} {vs:>8}")

    print(f"{'case':<34} {'ms/step':>9} {'x roofline':>10} {'x optax':>8}")
    # EMA: read g, read m, write m, write u.
    t_opt = _update_timer(optax.ema(0.9), params, grads, r)
    report("optax.ema(0.9)", t_opt, 4 * n * elem)
    t = _update_timer(optax_stab.ema_smoothing(0.9), params, grads, r)
    report("ema_smoothing(0.9)", t, 4 * n * elem, t_opt)
    # Windowed filters: read g, read W slots, write 1 slot, write u.
    for w in (5, 9):
        t = _update_timer(optax_stab.moving_average(w), params, grads, r)
        report(f"moving_average({w})", t, (w + 3) * n * elem)
        t = _update_timer(optax_stab.windowed_median(w), params, grads, r)
        report(f"windowed_median({w})", t, (w + 3) * n * elem)

    # Median of a full ring of 9: selection network vs jnp.median (same buffer).
    w = 9
    ring = _ring.init(params, w)
    for i in range(w):
        ring = _ring.push(ring, grads * (1 + 0.1 * i))
    net = jax.jit(lambda rg: _median.ring_median(rg, like=params))
    ref = jax.jit(lambda rg: jnp.median(rg.values, axis=0))
    t_net, t_ref = _time(net, ring, repeats=r), _time(ref, ring, repeats=r)
    same = bool(jnp.allclose(net(ring), ref(ring)))
    report("median network, full ring of 9", t_net, (w + 1) * n * elem)
    report("jnp.median, full ring of 9", t_ref, (w + 1) * n * elem)
    print(
        f"\njnp.median / network: {t_ref / t_net:.1f}x slower (results equal: {same})"
    )
    return rows


if __name__ == "__main__":
    main()
