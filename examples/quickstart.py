"""Quickstart: one extra line in an optax chain tames heavy-tailed gradient noise.

A linear regression whose minibatch gradients carry rare, huge outliers (one
step in ten is 1000x, as from a corrupted batch) is trained with SGD, with SGD
after an EMA of the gradients, and with SGD after a coordinate-wise windowed
median of the last 5 gradients. Plain SGD and the EMA diverge; the median
ignores the outliers and converges. Run:

    python examples/quickstart.py [--steps N]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import optax_stab


def train(tx: optax.GradientTransformation, steps: int, seed: int = 0) -> float:
    """Trains ``y = X w`` under gradient outliers; returns the final parameter error."""
    k_true, k_x = jax.random.split(jax.random.key(seed))
    w_true = jax.random.normal(k_true, (16,))
    x = jax.random.normal(k_x, (256, 16))
    y = x @ w_true

    def loss_fn(w, idx):
        return jnp.mean((x[idx] @ w - y[idx]) ** 2)

    def step(carry, key):
        w, state = carry
        k_batch, k_spike = jax.random.split(key)
        idx = jax.random.randint(k_batch, (32,), 0, 256)
        loss, g = jax.value_and_grad(loss_fn)(w, idx)
        # One step in ten carries a 1000x corrupted gradient.
        g = jnp.where(jax.random.uniform(k_spike) < 0.1, 1000.0 * g, g)
        updates, state = tx.update(g, state, w, loss=loss)
        return (optax.apply_updates(w, updates), state), loss

    w0 = jnp.zeros(16)
    keys = jax.random.split(jax.random.key(seed + 1), steps)
    (w, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, keys))((w0, tx.init(w0)))
    return float(jnp.linalg.norm(w - w_true))


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps")
    args = parser.parse_args(argv)
    chains = {
        "sgd": optax.sgd(0.05),
        "ema_smoothing(0.9) + sgd": optax.chain(
            optax_stab.ema_smoothing(0.9), optax.sgd(0.05)
        ),
        "windowed_median(5) + sgd": optax.chain(
            optax_stab.windowed_median(5), optax.sgd(0.05)
        ),
    }
    results = {name: train(tx, args.steps) for name, tx in chains.items()}
    print(f"{'chain':<28} |w - w_true| after {args.steps} steps")
    for name, err in results.items():
        print(f"{name:<28} {err:.4f}" if err == err else f"{name:<28} diverged (NaN)")
    return results


if __name__ == "__main__":
    main()
