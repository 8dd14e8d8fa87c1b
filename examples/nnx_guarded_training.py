"""Flax NNX training that survives a corrupted batch: spike_guard + health_monitor.

A small MLP learns a teacher network with ``spike_guard(optax.adam(...))``
behind a ``health_monitor``. Halfway through, one batch arrives with its labels
multiplied by 1000 (a corrupted shard). The guard sees the loss and gradient
norm spike against their rolling histories, skips that step (Adam's moments
stay exactly as they were) and counts it; the health report, printed every N
steps and at the corrupted step, shows the spike and training carrying on. The
same run without the guard is trained alongside for comparison: the corrupted
step inflates Adam's second moment and slows it down for many steps. Run:

    python examples/nnx_guarded_training.py [--quick]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optax_stab

DIM, HIDDEN, BATCH = 16, 64, 64


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(DIM, HIDDEN, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def _batches(steps: int, corrupt_at: int):
    """Teacher-student regression batches; labels x1000 at ``corrupt_at``."""
    teacher = MLP(nnx.Rngs(100))
    xs = jax.random.normal(jax.random.key(0), (steps, BATCH, DIM))
    ys = jax.vmap(teacher)(xs)
    return xs, ys.at[corrupt_at].multiply(1000.0)


def _loss_fn(model, x, y):
    return jnp.mean(jnp.square(model(x) - y))


@nnx.jit
def _train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(_loss_fn)(model, x, y)
    optimizer.update(model, grads, loss=loss)  # loss= reaches the guard
    return loss


def main(argv=None) -> dict:
    """Trains guarded and unguarded models; returns what it printed and measured."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (CI)")
    args = parser.parse_args(argv)
    steps, every = (120, 20) if args.quick else (600, 50)
    corrupt_at = steps // 2
    xs, ys = _batches(steps, corrupt_at)

    guarded = MLP(nnx.Rngs(0))
    tx = optax.chain(
        optax_stab.health_monitor(),
        optax_stab.spike_guard(optax.adam(3e-3), window=64, warmup_steps=20),
    )
    optimizer = nnx.Optimizer(guarded, tx, wrt=nnx.Param)
    plain = MLP(nnx.Rngs(0))
    plain_opt = nnx.Optimizer(plain, optax.adam(3e-3), wrt=nnx.Param)

    lines: list[str] = []

    def say(line: str) -> None:
        print(line)
        lines.append(line)

    say(f"corrupted batch (labels x1000) at step {corrupt_at} of {steps}")
    say(
        f"{'step':>5} {'loss':>10} {'grad_norm':>10} {'z':>8} {'exploding':>9} "
        f"{'spike_steps':>11} {'unguarded loss':>14}"
    )
    losses, plain_losses, reports = [], [], {}
    for t in range(steps):
        loss = float(_train_step(guarded, optimizer, xs[t], ys[t]))
        plain_loss = float(_train_step(plain, plain_opt, xs[t], ys[t]))
        losses.append(loss)
        plain_losses.append(plain_loss)
        if t % every == 0 or t in (corrupt_at, corrupt_at + 1) or t == steps - 1:
            r = optax_stab.health_report(optimizer)
            reports[t] = r
            say(
                f"{t:>5} {loss:>10.4g} {r['grad_norm']:>10.4g} "
                f"{r['grad_norm_z']:>8.3g} {r['exploding']:>9.0f} "
                f"{r['spike_steps']:>11.0f} {plain_loss:>14.4g}"
            )
    spike_report = {k: float(f"{v:.4g}") for k, v in reports[corrupt_at].items()}
    say(f"health_report at step {corrupt_at}: {spike_report}")
    clean = [t for t in range(steps) if t != corrupt_at]
    final = sum(losses[-10:]) / 10
    plain_final = sum(plain_losses[-10:]) / 10
    say(f"mean loss, last 10 steps: guarded {final:.4g}, unguarded {plain_final:.4g}")
    return {
        "lines": lines,
        "corrupt_at": corrupt_at,
        "losses": losses,
        "unguarded_losses": plain_losses,
        "reports": reports,
        "spike_steps": reports[steps - 1]["spike_steps"],
        "nonfinite_steps": reports[steps - 1]["nonfinite_steps"],
        "loss_before": losses[corrupt_at - 1],
        "max_clean_loss_after": max(losses[t] for t in clean if t > corrupt_at),
        "final_loss": final,
        "unguarded_final_loss": plain_final,
        "params_finite": all(
            bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(nnx.state(guarded))
        ),
    }


if __name__ == "__main__":
    main()
