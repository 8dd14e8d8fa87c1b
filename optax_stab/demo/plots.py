"""PNG plots of a demo run: loss curves, gradient-norm traces, divergence rates,
and of a ``--sweep``: final loss vs learning rate.

Curves are the median over seeds with the interquartile range as a band, on a
log scale. A NaN/Inf value counts as +inf and is drawn at the top of the
panel, so a chain whose seeds diverged shows a band that hits the ceiling.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from optax_stab.demo import runner, sweep


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Trailing moving average over the last axis (inf stays inf)."""
    if width <= 1:
        return x
    c = np.cumsum(np.where(np.isfinite(x), x, np.inf), axis=-1)
    out = np.empty_like(c)
    out[..., :width] = c[..., :width] / np.arange(1, width + 1)
    with np.errstate(invalid="ignore"):
        out[..., width:] = (c[..., width:] - c[..., :-width]) / width
    return np.where(np.isnan(out), np.inf, out)


def _bands(x: np.ndarray, ceiling: float) -> tuple[np.ndarray, ...]:
    """Median and IQR over seeds (axis 0), non-finite counted as the ceiling."""
    x = np.where(np.isfinite(x), x, np.inf)
    with np.errstate(invalid="ignore"):
        q25, q50, q75 = np.percentile(x, [25, 50, 75], axis=0)
    return tuple(
        np.minimum(np.nan_to_num(q, nan=ceiling), ceiling) for q in (q25, q50, q75)
    )


def _grid(n: int) -> tuple[int, int]:
    cols = min(4, n)
    return math.ceil(n / cols), cols


def _curves(
    run: runner.TaskRun, values: np.ndarray, ylabel: str, title: str, path: str
) -> None:
    plt = _pyplot()
    n = len(run.chains)
    nrows, ncols = _grid(n)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.6 * ncols, 2.7 * nrows), sharex=True, sharey=True
    )
    axes = np.atleast_1d(axes).ravel()
    finite = values[np.isfinite(values) & (values > 0)]
    lo = float(np.percentile(finite, 0.5)) if finite.size else 1e-3
    # Cap at 1000x the largest early median, so one blow-up keeps the others legible.
    early = values[..., : max(1, run.steps // 50)]
    early = early[np.isfinite(early) & (early > 0)]
    hi = float(np.max(early)) if early.size else 1.0
    ceiling = max(1000 * hi, 10 * lo)
    steps = np.arange(1, run.steps + 1)
    ref = _bands(values[0], ceiling)[1] if run.chains[0] == "plain" else None
    for c, ax in enumerate(axes):
        if c >= n:
            ax.axis("off")
            continue
        q25, q50, q75 = _bands(values[c], ceiling)
        if ref is not None and c > 0:
            ax.plot(steps, ref, color="0.6", lw=0.8, ls="--", label="plain (median)")
        ax.fill_between(steps, q25, q75, color="C0", alpha=0.3, lw=0, label="IQR")
        ax.plot(steps, q50, color="C0", lw=1.2, label="median")
        final = run.eval_loss[c, :, -1]
        diverged = int(np.sum(run.task.diverged(final)))
        ax.set_title(f"{run.chains[c]}  (diverged: {diverged}/{run.seeds})", fontsize=9)
        ax.set_yscale("log")
        ax.set_ylim(lo * 0.8, ceiling * 1.2)
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[-ncols:]:
        ax.set_xlabel("step")
    for ax in axes[::ncols]:
        ax.set_ylabel(ylabel)
    axes[min(1, n - 1)].legend(fontsize=7, loc="upper right")
    fig.suptitle(
        f"{title}\nvalues above the top of the axes (NaN/Inf too) drawn at it",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loss_curves(run: runner.TaskRun, path: str) -> None:
    """Training-loss curves per chain: median over seeds, IQR band, log scale."""
    width = max(1, run.steps // 50)
    values = _smooth(run.train_loss, width)
    _curves(
        run,
        values,
        "train loss",
        f"{run.task.name}: minibatch loss (moving mean over {width} steps), "
        f"median and IQR over {run.seeds} seeds; {run.task.optimizer} lr={run.lr:g}",
        path,
    )


def grad_norm_traces(run: runner.TaskRun, path: str) -> None:
    """Raw global gradient norm per chain: median over seeds, IQR band, log scale."""
    _curves(
        run,
        run.grad_norm,
        "grad norm",
        f"{run.task.name}: global norm of the raw gradients (before the chain), "
        f"median and IQR over {run.seeds} seeds",
        path,
    )


def divergence_bars(results: dict[str, Any], path: str) -> None:
    """Diverged seeds per chain, horizontal bars grouped by chain, one per task.

    Every bar is labelled with its count (``0/8`` too), so a chain that never
    diverged is visibly zero rather than a missing bar.
    """
    plt = _pyplot()
    tasks = list(results["tasks"])
    chains: list[str] = []
    for t in tasks:
        chains += [c for c in results["tasks"][t]["chains"] if c not in chains]
    n_tasks = max(1, len(tasks))
    height = min(0.8 / n_tasks, 0.3)
    fig, ax = plt.subplots(
        figsize=(7.5, 1.4 + 0.13 * len(chains) * n_tasks + 0.15 * len(chains))
    )
    y = np.arange(len(chains))
    for i, t in enumerate(tasks):
        pos = y + (i - (n_tasks - 1) / 2) * height
        label = t
        for yi, c in zip(pos, chains, strict=True):
            r = results["tasks"][t]["chains"].get(c)
            if r is None:
                continue
            rate = r["diverged_rate"] or 0.0
            ax.barh(yi, rate, height, color=f"C{i}", label=label)
            label = None  # one legend entry per task
            ax.plot(0, yi, "D", color=f"C{i}", ms=3, clip_on=False)  # zero too
            n = len(r["final_loss_per_seed"])
            ax.text(
                rate + 0.01, yi, f"{r['diverged_seeds']}/{n}", va="center", fontsize=7
            )
    ax.set_yticks(y, chains)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("diverged seeds (fraction)")
    ax.set_title(
        "Divergence per chain (final test loss NaN/Inf or above the bound)", fontsize=10
    )
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lr_sweep(run: sweep.SweepRun, path: str) -> None:
    """Final test loss vs learning rate, log-log, one line per chain.

    The line is the mean over seeds, the band the seeds' min-max, both capped
    at the loss at initialisation (NaN/Inf counts as it), as in the LR
    sensitivity; a star marks each chain's best learning rate.
    """
    plt = _pyplot()
    from matplotlib import ticker

    init = run.loss_at_init
    per_seed = np.where(np.isfinite(run.final_loss), run.final_loss, init)
    per_seed = np.minimum(per_seed, init)
    mean = sweep.capped_loss(run.final_loss, init)
    sens = sweep.lr_sensitivity(run.final_loss, init)
    colors = plt.get_cmap("tab20").colors
    styles = ("-", "--", "-.", ":")
    fig, ax = plt.subplots(figsize=(9.5, 5.2))
    for c, name in enumerate(run.chains):
        color = colors[(2 * c) % 20 if c < 10 else (2 * c + 1) % 20]
        ax.fill_between(
            run.lrs, per_seed[c].min(-1), per_seed[c].max(-1), color=color, alpha=0.1
        )
        ax.plot(
            run.lrs,
            mean[c],
            color=color,
            ls=styles[c % len(styles)],
            marker="o",
            ms=3,
            lw=1.4,
            label=f"{name} (sensitivity {sens[c]:.3g})",
        )
        best = int(np.argmin(mean[c]))
        ax.plot(run.lrs[best], mean[c, best], "*", color=color, ms=12, mec="k", mew=0.5)
    ax.axhline(init, color="0.4", lw=0.8, ls=":", label="loss at init (the cap)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(run.lrs, [f"{lr:g}" for lr in run.lrs])
    ax.minorticks_off()
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel(f"learning rate of {run.task.optimizer}")
    ax.set_ylabel("final test loss")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(
        f"{run.task.name}: final test loss after {run.steps} steps, mean over "
        f"{run.seeds} seeds (band: min-max)\nNaN/Inf and values above the loss at "
        "init drawn at it; \u2605 = each chain's best learning rate",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sweeps(runs: Sequence[sweep.SweepRun], out: str) -> list[str]:
    """Writes ``lr_sweep_<task>.png`` per sweep into ``out``; returns the names."""
    names = []
    for run in runs:
        name = f"lr_sweep_{run.task.name}.png"
        lr_sweep(run, os.path.join(out, name))
        names.append(name)
    return names


def write_all(
    runs: Sequence[runner.TaskRun], results: dict[str, Any], out: str
) -> list[str]:
    """Writes every plot into ``out``; returns the file names written."""
    names = []
    for run in runs:
        for prefix, fn in (("loss", loss_curves), ("grad_norm", grad_norm_traces)):
            name = f"{prefix}_{run.task.name}.png"
            fn(run, os.path.join(out, name))
            names.append(name)
    divergence_bars(results, os.path.join(out, "divergence.png"))
    names.append("divergence.png")
    return names
