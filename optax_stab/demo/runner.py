"""Trains every chain, learning rate and seed of one task in one compiled scan.

All chains of a task share the model, the seeds' initial parameters and the
seeds' minibatches (a paired comparison: chain ``c`` and seed ``s`` see exactly
the batches chain ``0`` and seed ``s`` see), at every learning rate. Parameters
are stacked as ``[chains, lrs, seeds, ...]`` (one learning rate in the default
demo, a grid in ``--sweep``): the forward and backward passes of all of them
run as one ``jax.vmap``'d computation, then each chain applies its own
optimizer, built with a traced learning rate, to its ``[lrs, seeds, ...]``
slice (``jax.vmap`` over learning rates and seeds). The training loop is a
``lax.scan`` over a chunk of steps inside ``jax.jit``; the same compiled chunk
is called again and again so a progress bar can move between chunks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_stab
from optax_stab import _tree
from optax_stab.demo import chains as chains_lib
from optax_stab.demo import tasks as tasks_lib

#: Target number of progress-bar updates (and test evaluations) per task.
CHUNKS = 20


@dataclasses.dataclass
class TaskRun:
    """Everything recorded while training one task.

    Attributes:
        task: The task.
        chains: Chain names, in the order of the leading axis of every array.
        seeds: Number of seeds.
        steps: Number of training steps.
        lr: Learning rate of the base optimizer.
        train_loss: ``[chains, seeds, steps]`` minibatch loss before each update.
        grad_norm: ``[chains, seeds, steps]`` global norm of the raw gradients.
        eval_steps: ``[evals]`` step counts at which the test set was scored.
        eval_loss: ``[chains, seeds, evals]`` test loss.
        eval_metric: ``[chains, seeds, evals]`` test metric (``task.metric``).
        health: ``[chains][seeds]`` ``optax_stab.health_report`` of the final
            optimizer state (empty dicts if ``health_report`` is unavailable).
        seconds: Wall time of compile plus training.
    """

    task: tasks_lib.Task
    chains: list[str]
    seeds: int
    steps: int
    lr: float
    train_loss: np.ndarray
    grad_norm: np.ndarray
    eval_steps: np.ndarray
    eval_loss: np.ndarray
    eval_metric: np.ndarray
    health: list[list[dict[str, float]]]
    seconds: float = 0.0


def chunk_size(steps: int, chunks: int = CHUNKS) -> int:
    """Steps per compiled chunk: about ``steps / chunks``, at least 1."""
    return max(1, math.ceil(steps / chunks))


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _health(state: Any, seeds: int) -> list[dict[str, float]]:
    report = getattr(optax_stab, "health_report", None)
    if report is None:
        return [{} for _ in range(seeds)]
    state = jax.device_get(state)
    return [report(jax.tree.map(lambda x, s=s: x[s], state)) for s in range(seeds)]


def make_program(
    task: tasks_lib.Task,
    builders: Sequence[Callable[[jax.Array], optax.GradientTransformation]],
    lrs: jax.typing.ArrayLike,
    seeds: int,
    steps: int,
    chunk: int,
) -> tuple[Callable[[], Any], Callable[[Any, jax.Array], Any]]:
    """Builds ``init() -> carry`` and the jitted ``run_chunk(carry, t0)``.

    Every chain is trained at every learning rate of ``lrs`` and every seed:
    ``builders[c](lr)`` builds chain ``c`` with ``lr`` a traced scalar, inside
    a ``jax.vmap`` over the learning rates, so the program holds each chain
    once whatever the number of learning rates (the default demo is the case
    of one). ``run_chunk`` trains steps ``t0 .. t0 + chunk - 1`` (steps at or
    past ``steps`` leave the carry unchanged) and returns
    ``(carry, (train_loss, grad_norm), (test_loss, test_metric))``, the per-step
    arrays shaped ``[chunk, chains, lrs, seeds]`` and the test ones
    ``[chains, lrs, seeds]``. The carry is ``(params, states)``, the params
    stacked ``[chains, lrs, seeds, ...]``.
    """
    n_chains = len(builders)
    lrs = jnp.asarray(lrs, jnp.float32)
    n_lrs = lrs.shape[0]
    seed_keys = jax.vmap(jax.random.key)(jnp.arange(seeds))

    def init():
        params = jax.vmap(task.init)(
            jax.vmap(lambda k: jax.random.fold_in(k, 0))(seed_keys)
        )
        states = tuple(
            jax.vmap(lambda lr, b=b: jax.vmap(b(lr).init)(params))(lrs)
            for b in builders
        )
        per_lr = _stack([params] * n_lrs)
        return _stack([per_lr] * n_chains), states

    # Over chains and learning rates: the same batch for every one of them.
    grad_fn = jax.vmap(
        jax.vmap(jax.vmap(jax.value_and_grad(task.loss)), in_axes=(0, None)),
        in_axes=(0, None),
    )
    norm_fn = jax.vmap(jax.vmap(jax.vmap(_tree.global_norm)))

    def step(carry, t):
        params, states = carry
        keys = jax.vmap(lambda k: jax.random.fold_in(k, t + 1))(seed_keys)
        batch = jax.vmap(task.sample)(keys)
        loss, grads = grad_fn(params, batch)
        new_params, new_states = [], []
        for c, build in enumerate(builders):
            p_c, g_c = jax.tree.map(lambda x, c=c: x[c], (params, grads))

            def update(lr, g, s, p, lo, build=build):
                tx = build(lr)
                return jax.vmap(lambda g, s, p, lo: tx.update(g, s, p, loss=lo))(
                    g, s, p, lo
                )

            u_c, s_c = jax.vmap(update)(lrs, g_c, states[c], p_c, loss[c])
            new_params.append(optax.apply_updates(p_c, u_c))
            new_states.append(s_c)
        new = (_stack(new_params), tuple(new_states))
        active = t < steps
        carry = jax.tree.map(lambda a, b: jnp.where(active, a, b), new, carry)
        return carry, (loss, norm_fn(grads))

    eval_fn = jax.vmap(jax.vmap(jax.vmap(task.evaluate)))

    @jax.jit
    def run_chunk(carry, t0):
        carry, per_step = jax.lax.scan(step, carry, t0 + jnp.arange(chunk))
        return carry, per_step, eval_fn(carry[0])

    return jax.jit(init), run_chunk


def builders(
    task: tasks_lib.Task, chain_names: Sequence[str]
) -> list[Callable[[jax.Array], optax.GradientTransformation]]:
    """``lr -> transform`` for each chain of ``chain_names`` on ``task``."""
    return [functools.partial(chains_lib.get_chain(n).build, task) for n in chain_names]


def train_task(
    task: tasks_lib.Task,
    chain_names: Sequence[str],
    *,
    seeds: int,
    steps: int,
    lr: float,
    on_progress: Callable[[int], None] | None = None,
) -> TaskRun:
    """Trains ``chain_names`` x ``seeds`` on ``task`` for ``steps`` steps.

    Args:
        task: The task.
        chain_names: Names from :data:`chains.CHAIN_NAMES`.
        seeds: Seeds ``0 .. seeds - 1``; seed ``s`` gets ``jax.random.key(s)``.
        steps: Training steps.
        lr: Learning rate of the task's base optimizer.
        on_progress: Called with the number of steps done after each chunk.

    Returns:
        A :class:`TaskRun`.
    """
    start = time.perf_counter()
    chunk = chunk_size(steps)
    init, run_chunk = make_program(
        task, builders(task, chain_names), [lr], seeds, steps, chunk
    )
    carry = init()
    losses, norms, eval_steps, eval_loss, eval_metric = [], [], [], [], []
    for t0 in range(0, steps, chunk):
        carry, (loss, norm), (e_loss, e_metric) = run_chunk(carry, jnp.int32(t0))
        # The one learning rate: [chunk, chains, 1, seeds] -> [chunk, chains, seeds]
        losses.append(np.asarray(loss)[:, :, 0])
        norms.append(np.asarray(norm)[:, :, 0])
        done = min(t0 + chunk, steps)
        eval_steps.append(done)
        eval_loss.append(np.asarray(e_loss)[:, 0])
        eval_metric.append(np.asarray(e_metric)[:, 0])
        if on_progress is not None:
            on_progress(done)
    # [chunks * chunk, chains, seeds] -> [chains, seeds, steps]
    train_loss = np.concatenate(losses)[:steps].transpose(1, 2, 0)
    grad_norm = np.concatenate(norms)[:steps].transpose(1, 2, 0)
    health = [_health(jax.tree.map(lambda x: x[0], s), seeds) for s in carry[1]]
    return TaskRun(
        task=task,
        chains=list(chain_names),
        seeds=seeds,
        steps=steps,
        lr=lr,
        train_loss=train_loss,
        grad_norm=grad_norm,
        eval_steps=np.asarray(eval_steps),
        eval_loss=np.stack(eval_loss, axis=-1),
        eval_metric=np.stack(eval_metric, axis=-1),
        health=health,
        seconds=time.perf_counter() - start,
    )
