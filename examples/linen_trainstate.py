"""Flax linen + ``TrainState`` + an optax_stab chain that survives corrupted batches.

A linen MLP classifies scikit-learn's digits with SGD + momentum. Every 25th
batch is corrupted (its inputs scaled by 1000, as from a broken preprocessing
step). The same ``TrainState`` loop runs twice:

* ``plain``: ``optax.sgd(0.05, momentum=0.9)``; each corrupted batch throws the
  weights far off and accuracy collapses;
* ``stable``: ``spike_guard(chain(clip_by_norm(1.0), sgd))``; the guard sees the
  loss and gradient-norm spike and skips the step, leaving the momentum
  untouched, and ``clip_by_norm`` bounds whatever passes.

``TrainState.apply_gradients`` forwards extra keyword arguments to
``.replace()``, not to the optimizer, so ``loss=`` needs the three-line
subclass below. Run:

    python examples/linen_trainstate.py [--quick] [--steps N]
"""

from __future__ import annotations

import argparse
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from sklearn.datasets import load_digits

import optax_stab

CORRUPT_EVERY = 25


class MLP(nn.Module):
    """Three ReLU layers and a linear head."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in (64, 64, 32):
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(10)(x)


class StableTrainState(train_state.TrainState):
    """A ``TrainState`` whose ``apply_gradients`` passes ``loss=`` to the optimizer."""

    def apply_gradients(self, *, grads: Any, loss: jax.Array) -> StableTrainState:
        updates, opt_state = self.tx.update(
            grads, self.opt_state, self.params, loss=loss
        )
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


def _data():
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(x))
    test, train = perm[:450], perm[450:]
    return (jnp.asarray(x[train]), jnp.asarray(y[train])), (
        jnp.asarray(x[test]),
        jnp.asarray(y[test]),
    )


def train(
    tx: optax.GradientTransformation, steps: int, seed: int = 0
) -> dict[str, Any]:
    """Trains the MLP with ``tx``; returns final test accuracy, losses and state."""
    (x_tr, y_tr), (x_te, y_te) = _data()
    model = MLP()
    key = jax.random.key(seed)
    state = StableTrainState.create(
        apply_fn=model.apply, params=model.init(key, x_tr[:1]), tx=tx
    )

    def loss_fn(params, x, y):
        logits = state.apply_fn(params, x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    @jax.jit
    def step(state, t):
        idx = jax.random.randint(jax.random.fold_in(key, t), (64,), 0, x_tr.shape[0])
        corrupt = (t + 1) % CORRUPT_EVERY == 0
        x = jnp.where(corrupt, 1000.0, 1.0) * x_tr[idx]
        loss, grads = jax.value_and_grad(loss_fn)(state.params, x, y_tr[idx])
        return state.apply_gradients(grads=grads, loss=loss), loss

    losses = []
    for t in range(steps):
        state, loss = step(state, t)
        losses.append(float(loss))
    logits = state.apply_fn(state.params, x_te)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_te))
    return {"accuracy": accuracy, "losses": losses, "state": state}


def make_chains(lr: float = 0.05) -> dict[str, optax.GradientTransformation]:
    """The plain optimizer and the stabilised chain."""
    base = optax.sgd(lr, momentum=0.9)
    return {
        "plain": base,
        "stable": optax_stab.spike_guard(
            optax.chain(optax_stab.clip_by_norm(1.0), base), window=64, warmup_steps=10
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Trains both chains; returns ``{name: {"accuracy", "losses", "state"}}``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps")
    parser.add_argument("--quick", action="store_true", help="200 steps (for CI)")
    args = parser.parse_args(argv)
    steps = 200 if args.quick else args.steps
    results = {name: train(tx, steps) for name, tx in make_chains().items()}
    corrupted = steps // CORRUPT_EVERY
    print(f"{steps} steps, {corrupted} corrupted batches (inputs x1000)")
    for name, r in results.items():
        report = optax_stab.health_report(r["state"])
        skipped = report.get("spike_steps", 0.0)
        print(
            f"{name:<7} test accuracy {r['accuracy']:.3f}  skipped steps {skipped:.0f}"
        )
    return results


if __name__ == "__main__":
    main()
