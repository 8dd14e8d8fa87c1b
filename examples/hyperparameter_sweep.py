"""Sweep 16 clipping thresholds in one compiled call: inject_hyperparams + vmap.

``optax.inject_hyperparams`` moves a transform's numeric hyperparameters into
its state (``state.hyperparams``), so a batch of states with different values
is just a pytree with a leading axis, and ``jax.vmap`` trains all of them at
once. Here the linear regression of scikit-learn's diabetes data (standardised)
is trained with ``chain(clip_by_norm(max_norm), sgd(0.3))`` at a learning rate
where unclipped SGD diverges, for 16 values of ``max_norm`` from 0.01 to 1000
in one ``jax.jit(jax.vmap(train))`` call. Small thresholds converge (slowly),
large ones let the instability through. Structural arguments stay static:
``clip_by_norm``'s ``scope`` (like a filter's ``window``) goes in
``static_args``. Run:

    python examples/hyperparameter_sweep.py [--quick] [--steps N]
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_diabetes

import optax_stab

LR = 0.3
MAX_NORMS = np.logspace(-2, 3, 16).astype(np.float32)


def _data() -> tuple[jax.Array, jax.Array]:
    data = load_diabetes()
    x = (data.data - data.data.mean(0)) / data.data.std(0)
    y = (data.target - data.target.mean()) / data.target.std()
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def make_train(tx: optax.GradientTransformation, steps: int):
    """``train(opt_state) -> (final MSE, params)`` for a given chain ``tx``."""
    x, y = _data()
    params = {"w": jnp.zeros(x.shape[1]), "b": jnp.zeros([])}
    key = jax.random.key(0)

    def loss_fn(p, xb, yb):
        return jnp.mean(jnp.square(xb @ p["w"] + p["b"] - yb))

    def train(opt_state):
        def step(carry, t):
            p, s = carry
            idx = jax.random.randint(jax.random.fold_in(key, t), (8,), 0, x.shape[0])
            loss, g = jax.value_and_grad(loss_fn)(p, x[idx], y[idx])
            u, s = tx.update(g, s, p, loss=loss)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(step, (params, opt_state), jnp.arange(steps))
        return loss_fn(p, x, y), p

    return train, params


def sweep(steps: int) -> np.ndarray:
    """Final MSE for each of :data:`MAX_NORMS`, all in one compiled, vmapped call."""
    clip = optax.inject_hyperparams(optax_stab.clip_by_norm, static_args=("scope",))
    tx = optax.chain(clip(max_norm=1.0, scope="global"), optax.sgd(LR))
    train, params = make_train(tx, steps)
    one = tx.init(params)
    # One optimizer state per threshold: broadcast, then write the 16 values.
    states = jax.tree.map(lambda a: jnp.broadcast_to(a, (16, *a.shape)), one)
    hyper = dict(states[0].hyperparams, max_norm=jnp.asarray(MAX_NORMS))
    states = (states[0]._replace(hyperparams=hyper), states[1])
    mse, _ = jax.jit(jax.vmap(train))(states)
    return np.asarray(mse)


def separate_runs(steps: int, which=None) -> np.ndarray:
    """Runs ``which`` (default: all 16) one by one, each a plain ``clip_by_norm``."""
    out = []
    which = range(len(MAX_NORMS)) if which is None else which
    for value in MAX_NORMS[list(which)]:
        tx = optax.chain(optax_stab.clip_by_norm(float(value)), optax.sgd(LR))
        train, params = make_train(tx, steps)
        mse, _ = jax.jit(train)(tx.init(params))
        out.append(float(mse))
    return np.asarray(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the sweep; returns ``{"max_norm": [...], "mse": [...]}``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="training steps")
    parser.add_argument("--quick", action="store_true", help="100 steps (for CI)")
    args = parser.parse_args(argv)
    steps = 100 if args.quick else args.steps
    mse = sweep(steps)
    print(f"chain(clip_by_norm(max_norm), sgd({LR})), {steps} steps, full-data MSE:")
    for m, v in zip(MAX_NORMS, mse):
        print(f"  max_norm {m:9.3g}   MSE {v:.4g}")
    return {"max_norm": MAX_NORMS.tolist(), "mse": mse.tolist(), "steps": steps}


if __name__ == "__main__":
    main()
