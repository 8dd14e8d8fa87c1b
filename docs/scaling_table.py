"""Measures optimizer-state bytes per parameter and writes docs/scaling.md's tables.

Every public transform's ``init`` is run through ``jax.eval_shape`` (no memory
is allocated, nothing is compiled) on small trees of known size. From three
trees (2 leaves of 64, 2 leaves of 128 and 4 leaves of 64 elements) the state
size is split into bytes per parameter, bytes per leaf and a constant, which
are exact: every state is affine in those counts. The per-device table scales
the per-parameter bytes to 1B / 7B / 70B parameters fully sharded over 8 / 64 /
512 devices.

    python docs/scaling_table.py          # print the tables
    python docs/scaling_table.py --write  # rewrite them in docs/scaling.md
    python docs/scaling_table.py --check  # exit 1 if docs/scaling.md is stale
    python docs/scaling_table.py --temps  # XLA temporaries of a compiled step

``--temps`` compiles a donated ``update + apply_updates`` step of a few chains
on 4 MiB of float32 params and prints XLA's ``memory_analysis()`` in multiples
of the params' bytes (backend- and version-dependent, so not in the check).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_stab

SCALING_MD = pathlib.Path(__file__).with_name("scaling.md")
BEGIN = "<!-- scaling_table.py: begin -->"
END = "<!-- scaling_table.py: end -->"
BF16 = jnp.bfloat16

# (label, factory, note). Guards wrap optax.identity(): their own state only.
TRANSFORMS: list[tuple[str, Callable[[], Any], str]] = [
    ("clip_by_norm()", lambda: optax_stab.clip_by_norm(1.0), "clipper"),
    (
        'clip_by_norm(scope="leaf")',
        lambda: optax_stab.clip_by_norm(1.0, scope="leaf"),
        "clipper",
    ),
    ("autoclip()", optax_stab.autoclip, "clipper"),
    ("zscore_clip()", optax_stab.zscore_clip, "clipper"),
    ("adaptive_tensor_clip()", optax_stab.adaptive_tensor_clip, "clipper"),
    ("spike_clip()", optax_stab.spike_clip, "per-coordinate EMA"),
    (
        "spike_clip(nu_dtype=bfloat16)",
        lambda: optax_stab.spike_clip(nu_dtype=BF16),
        "per-coordinate EMA",
    ),
    (
        "guard_nonfinite(inner)",
        lambda: optax_stab.guard_nonfinite(optax.identity()),
        "guard",
    ),
    (
        "spike_guard(inner)",
        lambda: optax_stab.spike_guard(optax.identity()),
        "guard",
    ),
    ("health_monitor()", optax_stab.health_monitor, "monitor"),
    ("sign_power(0.5)", lambda: optax_stab.sign_power(0.5), "stateless"),
    ("sign_sqrt_amplification()", optax_stab.sign_sqrt_amplification, "stateless"),
    ("clip_weights(1.0)", lambda: optax_stab.clip_weights(1.0), "stateless"),
    ("add_l1_penalty(1e-4)", lambda: optax_stab.add_l1_penalty(1e-4), "stateless"),
    ("ema_smoothing(0.9)", lambda: optax_stab.ema_smoothing(0.9), "EMA"),
    (
        "ema_smoothing(0.9, accumulator_dtype=bfloat16)",
        lambda: optax_stab.ema_smoothing(0.9, accumulator_dtype=BF16),
        "EMA",
    ),
    ("amplify_slow()", optax_stab.amplify_slow, "EMA (Grokfast)"),
    ("moving_average(8)", lambda: optax_stab.moving_average(8), "window W = 8"),
    (
        "moving_average(8, accumulator_dtype=bfloat16)",
        lambda: optax_stab.moving_average(8, accumulator_dtype=BF16),
        "window W = 8",
    ),
    ("gaussian_smoothing(8)", lambda: optax_stab.gaussian_smoothing(8), "W = 8"),
    (
        "gaussian_smoothing(8, accumulator_dtype=bfloat16)",
        lambda: optax_stab.gaussian_smoothing(8, accumulator_dtype=BF16),
        "W = 8",
    ),
    (
        "fir_smoothing(4 weights)",
        lambda: optax_stab.fir_smoothing([4.0, 3.0, 2.0, 1.0]),
        "W = 4",
    ),
    ("windowed_median(5)", lambda: optax_stab.windowed_median(5), "W = 5"),
    (
        "windowed_median(5, accumulator_dtype=bfloat16)",
        lambda: optax_stab.windowed_median(5, accumulator_dtype=BF16),
        "W = 5",
    ),
    ("optax.adamw(1e-3)", lambda: optax.adamw(1e-3), "baseline"),
]

# The per-device table: the baseline plus one stabiliser at a time.
SCALE_COLUMNS = [
    ("+ clippers, guards, health", None),
    ("+ ema_smoothing", "ema_smoothing(0.9)"),
    ("+ spike_clip", "spike_clip()"),
    ("+ moving_average(8)", "moving_average(8)"),
    ("+ moving_average(8), bf16 ring", "moving_average(8, accumulator_dtype=bfloat16)"),
    ("+ windowed_median(5)", "windowed_median(5)"),
    (
        "+ windowed_median(5), bf16 ring",
        "windowed_median(5, accumulator_dtype=bfloat16)",
    ),
]
MODELS = [1e9, 7e9, 70e9]
DEVICES = [8, 64, 512]
HBM = 80e9  # bytes of an "80 GB" accelerator


def state_bytes(tx: optax.GradientTransformation, leaves: int, size: int, dtype):
    params = {f"w{i}": jnp.zeros((size,), dtype) for i in range(leaves)}
    shapes = jax.eval_shape(tx.init, params)
    return sum(
        int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(shapes)
    )


def measure(factory, dtype) -> tuple[float, float, float]:
    """(bytes per parameter, bytes per leaf, constant bytes) of the state."""
    tx = factory()
    base = state_bytes(tx, 2, 64, dtype)
    per_param = (state_bytes(tx, 2, 128, dtype) - base) / 128
    per_leaf = (state_bytes(tx, 4, 64, dtype) - base) / 2 - 64 * per_param
    const = base - 2 * per_leaf - 128 * per_param
    return per_param, per_leaf, const


def _num(x: float) -> str:
    return f"{x:g}"


def per_parameter_table(measured) -> list[str]:
    rows = [
        "| transform | kind | B/param, f32 params | B/param, bf16 params "
        "| B/leaf | B constant |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, _, note in TRANSFORMS:
        f32, bf16 = measured[label, "float32"], measured[label, "bfloat16"]
        rows.append(
            f"| `{label}` | {note} | {_num(f32[0])} | {_num(bf16[0])} "
            f"| {_num(f32[1])} | {_num(f32[2])} |"
        )
    return rows


def per_device_table(measured) -> list[str]:
    head = ["params", "devices", "param dtype", "params + adamw"]
    head += [c for c, _ in SCALE_COLUMNS]
    rows = [
        "| " + " | ".join(head) + " |",
        "|---|---:|---|" + "---:|" * (len(head) - 3),
    ]
    for n in MODELS:
        for d in DEVICES:
            for dtype, name in (("float32", "f32"), ("bfloat16", "bf16")):
                param_b = np.dtype(dtype).itemsize
                base = n / d * (param_b + measured["optax.adamw(1e-3)", dtype][0])
                cells = [_gb(base)]
                for _, label in SCALE_COLUMNS:
                    extra = 0.0 if label is None else measured[label, dtype][0]
                    cells.append(_gb(base + n / d * extra))
                rows.append(
                    f"| {n / 1e9:g}B | {d} | {name} | " + " | ".join(cells) + " |"
                )
    return rows


def _gb(b: float) -> str:
    gb = b / 1e9
    text = f"{gb:.1f}" if gb >= 1 else f"{gb:.3f}"
    return text if b <= HBM else f"**{text}** ✗"


def render() -> str:
    measured = {}
    for label, factory, _ in TRANSFORMS:
        for dtype in ("float32", "bfloat16"):
            measured[label, dtype] = measure(factory, jnp.dtype(dtype))
    lines = [
        BEGIN,
        "",
        "### State bytes per parameter (measured)",
        "",
        *per_parameter_table(measured),
        "",
        "### Per-device GB, fully sharded (params + optimizer state only)",
        "",
        *per_device_table(measured),
        "",
        END,
    ]
    return "\n".join(lines)


def temporaries() -> list[str]:
    """XLA's buffers of a donated step, in multiples of the params' bytes."""
    params = {f"w{i}": jnp.zeros((1 << 16,), jnp.float32) for i in range(16)}
    p_bytes = 16 * (1 << 16) * 4
    adamw = optax.adamw(1e-3)
    chains = {
        "adamw": adamw,
        "guard_nonfinite(adamw)": optax_stab.guard_nonfinite(adamw),
        "spike_guard(adamw)": optax_stab.spike_guard(adamw),
        "chain(health_monitor, zscore_clip, adamw)": optax.chain(
            optax_stab.health_monitor(), optax_stab.zscore_clip(), adamw
        ),
        "chain(ema_smoothing, adamw)": optax.chain(
            optax_stab.ema_smoothing(0.9), adamw
        ),
        "chain(windowed_median(5), adamw)": optax.chain(
            optax_stab.windowed_median(5), adamw
        ),
    }
    rows = [
        f"jax {jax.__version__}, optax {optax.__version__}, "
        f"{jax.default_backend()} backend; x params bytes:",
        f"{'step':45s} {'arguments':>9s} {'temporaries':>11s}",
    ]
    for name, tx in chains.items():

        def step(params, state, grads, tx=tx):
            updates, state = tx.update(grads, state, params, loss=jnp.float32(1.0))
            return optax.apply_updates(params, updates), state

        state = tx.init(params)
        jitted = jax.jit(step, donate_argnums=(0, 1))
        stats = jitted.lower(params, state, params).compile().memory_analysis()
        rows.append(
            f"{name:45s} {stats.argument_size_in_bytes / p_bytes:9.2f} "
            f"{stats.temp_size_in_bytes / p_bytes:11.2f}"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="update docs/scaling.md")
    mode.add_argument("--check", action="store_true", help="fail if it is stale")
    mode.add_argument("--temps", action="store_true", help="XLA temporaries")
    args = parser.parse_args(argv)
    if args.temps:
        print("\n".join(temporaries()))
        return 0
    table = render()
    if not (args.write or args.check):
        print(table)
        return 0
    text = SCALING_MD.read_text()
    start, stop = text.index(BEGIN), text.index(END) + len(END)
    if args.check:
        fresh = text[start:stop] == table
        if not fresh:
            print("docs/scaling.md is stale: run python docs/scaling_table.py --write")
        return 0 if fresh else 1
    SCALING_MD.write_text(text[:start] + table + text[stop:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
