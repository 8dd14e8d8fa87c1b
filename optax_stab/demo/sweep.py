"""Learning-rate sweeps: every chain at every learning rate of a task's grid.

``optax-stab demo --sweep`` trains each task's chains at each learning rate
of :attr:`~optax_stab.demo.tasks.Task.sweep_lrs` and seeds in one program
(:func:`optax_stab.demo.runner.make_program` with an axis of learning rates),
and scores each chain by its *learning-rate sensitivity* (Wortsman et al.,
2023): how much worse than the best run it ends, averaged over the grid. A
stabiliser that widens the range of usable learning rates lowers it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_stab.demo import runner
from optax_stab.demo import tasks as tasks_lib


@dataclasses.dataclass
class SweepRun:
    """The final test losses of one task's sweep.

    Attributes:
        task: The task.
        chains: Chain names, in the order of the leading axis of ``final_loss``.
        lrs: ``[lrs]`` learning rates of the base optimizer, increasing.
        seeds: Number of seeds.
        steps: Training steps of every run.
        final_loss: ``[chains, lrs, seeds]`` final test loss (may be NaN/Inf).
        init_loss: ``[seeds]`` test loss of each seed's initial parameters
            (shared by every chain and learning rate).
        seconds: Wall time of compile plus training.
    """

    task: tasks_lib.Task
    chains: list[str]
    lrs: np.ndarray
    seeds: int
    steps: int
    final_loss: np.ndarray
    init_loss: np.ndarray
    seconds: float = 0.0

    @property
    def loss_at_init(self) -> float:
        """Mean test loss at initialisation over the seeds."""
        return float(np.mean(self.init_loss))


def grid(task: tasks_lib.Task, *, quick: bool = False) -> tuple[float, ...]:
    """``task``'s learning-rate grid; with ``quick`` its two ends and middle only."""
    lrs = task.sweep_lrs
    if quick and len(lrs) > 3:
        return (lrs[0], lrs[len(lrs) // 2], lrs[-1])
    return lrs


def train_sweep(
    task: tasks_lib.Task,
    chain_names: Sequence[str],
    *,
    lrs: Sequence[float],
    seeds: int,
    steps: int,
    on_progress: Callable[[int], None] | None = None,
) -> SweepRun:
    """Trains ``chain_names`` x ``lrs`` x ``seeds`` on ``task`` in one program.

    Args:
        task: The task.
        chain_names: Names from :data:`optax_stab.demo.chains.CHAIN_NAMES`.
        lrs: Learning rates of the task's base optimizer.
        seeds: Seeds ``0 .. seeds - 1``, as in :func:`runner.train_task`.
        steps: Training steps.
        on_progress: Called with the number of steps done after each chunk.

    Returns:
        A :class:`SweepRun`.
    """
    start = time.perf_counter()
    chunk = runner.chunk_size(steps)
    init, run_chunk = runner.make_program(
        task, runner.builders(task, chain_names), lrs, seeds, steps, chunk
    )
    carry = init()
    first = jax.tree.map(lambda x: x[0, 0], carry[0])  # [seeds, ...], same for all
    init_loss = np.asarray(jax.jit(jax.vmap(task.evaluate))(first)[0])
    test_loss = None
    for t0 in range(0, steps, chunk):
        carry, _, (test_loss, _) = run_chunk(carry, jnp.int32(t0))
        if on_progress is not None:
            on_progress(min(t0 + chunk, steps))
    return SweepRun(
        task=task,
        chains=list(chain_names),
        lrs=np.asarray(lrs, dtype=np.float64),
        seeds=seeds,
        steps=steps,
        final_loss=np.asarray(test_loss, dtype=np.float64),
        init_loss=init_loss.astype(np.float64),
        seconds=time.perf_counter() - start,
    )


def capped_loss(final_loss: np.ndarray, loss_at_init: float) -> np.ndarray:
    """``[chains, lrs]``: min(mean over seeds of the final loss, loss at init).

    A NaN/Inf final loss counts as ``loss_at_init`` before the mean.
    """
    final = np.asarray(final_loss, dtype=np.float64)
    final = np.where(np.isfinite(final), final, loss_at_init)
    return np.minimum(np.mean(final, axis=-1), loss_at_init)


def lr_sensitivity(final_loss: np.ndarray, loss_at_init: float) -> np.ndarray:
    r"""Learning-rate sensitivity of each chain (Wortsman et al., 2023).

    With :math:`L_c(\eta)` the mean over seeds of chain :math:`c`'s final loss
    at learning rate :math:`\eta` (a NaN/Inf loss counted as the loss at
    initialisation :math:`L_0`), the sensitivity is
    :math:`\mathrm{mean}_\eta [\min(L_c(\eta), L_0) - L^*]` with
    :math:`L^* = \min_{c, \eta} \min(L_c(\eta), L_0)` the best of any chain at
    any learning rate of the grid. Zero for a chain that is best at every
    learning rate; lower is better.

    Args:
        final_loss: ``[chains, lrs, seeds]`` final test losses.
        loss_at_init: Test loss at initialisation.

    Returns:
        ``[chains]`` sensitivities.
    """
    capped = capped_loss(final_loss, loss_at_init)
    return np.mean(capped - np.min(capped), axis=-1)


def summarize(run: SweepRun) -> dict[str, Any]:
    """One task's entry of ``results.json``'s ``"sweep"`` (NaN/Inf as ``None``)."""
    init = run.loss_at_init
    capped = capped_loss(run.final_loss, init)
    sens = lr_sensitivity(run.final_loss, init)
    diverged = run.task.diverged(run.final_loss)
    best = np.unravel_index(np.argmin(capped), capped.shape)
    chains = {}
    for c, name in enumerate(run.chains):
        chains[name] = {
            "lr_sensitivity": float(sens[c]),
            "diverged_fraction": float(np.mean(diverged[c])),
            "best_lr": float(run.lrs[np.argmin(capped[c])]),
            "best_loss": float(np.min(capped[c])),
            "capped_loss_per_lr": [float(v) for v in capped[c]],
            "final_loss_per_run": [
                [_finite_or_none(v) for v in per_lr] for per_lr in run.final_loss[c]
            ],
        }
    return {
        "title": run.task.title,
        "optimizer": run.task.optimizer,
        "lrs": [float(v) for v in run.lrs],
        "steps": run.steps,
        "seeds": run.seeds,
        "loss_at_init": init,
        "best_loss": float(capped[best]),
        "best_chain": run.chains[best[0]],
        "best_lr": float(run.lrs[best[1]]),
        "diverged_definition": run.task.diverged_text,
        "seconds": run.seconds,
        "chains": chains,
    }


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
