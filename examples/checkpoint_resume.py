"""Orbax checkpoint of params + full optimizer state; resume is bit-identical.

The optimizer state of an optax_stab chain is a plain pytree of arrays:
ring buffers of a windowed filter, the EMA statistics of ZClip and the
loss/norm histories of a spike guard all round-trip through orbax like the
params do. This script trains a linen MLP on scikit-learn's digits with

    spike_guard(chain(windowed_median(5), zscore_clip(), adam(1e-2)))

for ``2 * --save-at`` steps in one go, and again in two halves: it saves the
params, the optimizer state and the step at ``--save-at`` with orbax, builds a
fresh model, optimizer and step function (as a new process would), restores
the checkpoint into them and trains on. Batches depend only on the step
number, so the two runs must agree bit for bit. Run:

    python examples/checkpoint_resume.py [--quick] [--save-at N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from sklearn.datasets import load_digits

import optax_stab


class MLP(nn.Module):
    """Two ReLU layers and a linear head."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(64)(x))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


def make_tx() -> optax.GradientTransformation:
    """The chain whose state (ring buffers, guard histories) is checkpointed."""
    inner = optax.chain(
        optax_stab.windowed_median(5), optax_stab.zscore_clip(), optax.adam(1e-2)
    )
    return optax_stab.spike_guard(inner, window=32, warmup_steps=10)


def fresh_setup(seed: int = 0) -> tuple[dict[str, Any], Any]:
    """A new model, optimizer and jitted step: ``(state, step_fn)``."""
    digits = load_digits()
    x = jnp.asarray(digits.data / 16.0, jnp.float32)
    y = jnp.asarray(digits.target, jnp.int32)
    model, tx = MLP(), make_tx()
    params = model.init(jax.random.key(seed), x[:1])
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
    data_key = jax.random.key(1234)

    def loss_fn(params, xb, yb):
        logits = model.apply(params, xb)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))

    @jax.jit
    def step_fn(state):
        key = jax.random.fold_in(data_key, state["step"])
        idx = jax.random.randint(key, (64,), 0, x.shape[0])
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], x[idx], y[idx])
        updates, opt_state = tx.update(
            grads, state["opt_state"], state["params"], loss=loss
        )
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}

    return state, step_fn


def train(state: dict[str, Any], step_fn: Any, steps: int) -> dict[str, Any]:
    """Runs ``steps`` steps of ``step_fn``."""
    for _ in range(steps):
        state = step_fn(state)
    return state


def save(path: str, state: dict[str, Any]) -> None:
    """Saves the whole training state (params, optimizer state, step) with orbax."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, state)
    checkpointer.wait_until_finished()


def restore(path: str, like: dict[str, Any]) -> dict[str, Any]:
    """Restores a state saved by :func:`save` into the structure of ``like``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return ocp.StandardCheckpointer().restore(path, abstract)


def trees_identical(a: Any, b: Any) -> bool:
    """Same structure and bit-identical leaves."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        np.asarray(x).dtype == np.asarray(y).dtype
        and np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs both ways; returns the two final states and whether they are identical."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save-at", type=int, default=50, help="checkpoint step")
    parser.add_argument("--dir", default=None, help="checkpoint folder (default: tmp)")
    parser.add_argument("--quick", action="store_true", help="same as the defaults")
    args = parser.parse_args(argv)
    half = args.save_at

    state, step_fn = fresh_setup()
    uninterrupted = train(state, step_fn, 2 * half)

    state, step_fn = fresh_setup()
    at_checkpoint = train(state, step_fn, half)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.abspath(os.path.join(args.dir or tmp, f"step_{half}"))
        save(path, at_checkpoint)
        del state, step_fn, at_checkpoint
        # A fresh setup, as a new process would build it (another seed, so
        # nothing but the checkpoint can make the params right).
        like, step_fn = fresh_setup(seed=1)
        restored = restore(path, like)
    resumed = train(restored, step_fn, half)

    identical = trees_identical(resumed, uninterrupted)
    report = optax_stab.health_report(resumed["opt_state"])
    print(
        f"step {int(resumed['step'])}: resumed == uninterrupted (params and optimizer "
        f"state, bit for bit): {identical}; guard saw {report['accepted_steps']:.0f} "
        f"accepted and {report['spike_steps']:.0f} skipped steps"
    )
    return {"resumed": resumed, "uninterrupted": uninterrupted, "identical": identical}


if __name__ == "__main__":
    main()
