"""Flax NNX + ``nnx.Optimizer``: ``loss=`` reaches a ``spike_guard``; health is logged.

An NNX MLP regresses scikit-learn's diabetes target (standardised). Every 40th
batch has its targets corrupted (scaled by 100), so the loss spikes. The
optimizer is

    chain(health_monitor(), spike_guard(adam(3e-3)))

``optimizer.update(model, grads, loss=loss)`` passes the loss through the
chain to the guard, which skips the spiking steps and counts them in
``spike_steps``. Every ``--log-every`` steps the script logs
``optax_stab.health_report(optimizer.opt_state)``: the global gradient norm,
its z-score, the guard's counters. Run:

    python examples/nnx_optimizer.py [--quick] [--steps N] [--log-every N]
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from sklearn.datasets import load_diabetes

import optax_stab

SPIKE_EVERY = 40


class MLP(nnx.Module):
    """Two tanh hidden layers and a scalar head."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(10, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 32, rngs=rngs)
        self.out = nnx.Linear(32, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))[:, 0]


def _data() -> tuple[jax.Array, jax.Array]:
    data = load_diabetes()
    x = (data.data - data.data.mean(0)) / data.data.std(0)
    y = (data.target - data.target.mean()) / data.target.std()
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Trains with a spike guard; returns the health log and final counters."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800, help="training steps")
    parser.add_argument("--log-every", type=int, default=100, help="log interval")
    parser.add_argument("--quick", action="store_true", help="200 steps (for CI)")
    args = parser.parse_args(argv)
    steps = 200 if args.quick else args.steps
    log_every = 50 if args.quick else args.log_every

    x, y = _data()
    model = MLP(nnx.Rngs(0))
    tx = optax.chain(
        optax_stab.health_monitor(),
        optax_stab.spike_guard(optax.adam(3e-3), window=64, warmup_steps=20),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    key = jax.random.key(0)

    @nnx.jit
    def train_step(model, optimizer, t):
        idx = jax.random.randint(jax.random.fold_in(key, t), (32,), 0, x.shape[0])
        scale = jnp.where((t + 1) % SPIKE_EVERY == 0, 100.0, 1.0)

        def loss_fn(model):
            return jnp.mean(jnp.square(model(x[idx]) - scale * y[idx]))

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads, loss=loss)
        return loss

    log = []
    for t in range(steps):
        loss = train_step(model, optimizer, jnp.int32(t))
        if (t + 1) % log_every == 0:
            report = optax_stab.health_report(optimizer.opt_state)
            entry = {"step": t + 1, "loss": float(loss), **report}
            log.append(entry)
            print(
                f"step {t + 1:5d}  loss {entry['loss']:.4f}  "
                f"grad_norm {report['grad_norm']:.3f}  "
                f"spike_steps {report['spike_steps']:.0f}  "
                f"nonfinite_steps {report['nonfinite_steps']:.0f}"
            )
    final = optax_stab.health_report(optimizer.opt_state)
    mse = float(jnp.mean(jnp.square(model(x) - y)))
    injected = steps // SPIKE_EVERY
    skipped = final["spike_steps"]
    print(f"{injected} corrupted batches, {skipped:.0f} skipped; MSE {mse:.3f}")
    return {"log": log, "final": final, "mse": mse, "injected_spikes": injected}


if __name__ == "__main__":
    main()
