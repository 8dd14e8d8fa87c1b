"""Summaries of a demo run: per-chain statistics, the terminal table, JSON, Markdown.

Statistics are over seeds, on each seed's *final* test loss (a NaN/Inf loss
counts as +inf, so a median over mostly diverged seeds is inf). Skipped and
clipped step counts come from :func:`optax_stab.health_report` of the final
optimizer state (``spike_steps`` / ``nonfinite_steps`` of the guards,
``clipped_steps`` of the clippers); for ``optax.clip_by_global_norm``, which
keeps no counter, they are counted from the recorded raw gradient norms.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from optax_stab.demo import chains as chains_lib
from optax_stab.demo import runner

#: Keys of each chain's entry in ``results.json``.
CHAIN_KEYS = (
    "description",
    "final_loss_median",
    "final_loss_q25",
    "final_loss_q75",
    "final_metric_median",
    "diverged_rate",
    "diverged_seeds",
    "solved_seeds",
    "steps_to_solve_median",
    "skipped_steps_median",
    "clipped_steps_median",
    "grad_norm_max_median",
    "final_loss_per_seed",
)


def _last(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def _count(report: dict[str, float], name: str) -> float:
    return float(sum(v for k, v in report.items() if _last(k) == name))


def skipped_steps(report: dict[str, float]) -> float | None:
    """Steps a guard skipped (zero update), or ``None`` if no guard is present."""
    if any(_last(k) == "spike_steps" for k in report):
        return _count(report, "spike_steps")  # includes its non-finite steps
    if any(_last(k) == "nonfinite_steps" for k in report):
        return _count(report, "nonfinite_steps") - _count(
            report, "applied_nonfinite_steps"
        )
    return None


def clipped_steps(report: dict[str, float]) -> float | None:
    """Steps a clipper scaled down, or ``None`` if no clipper counts them."""
    if any(_last(k) == "clipped_steps" for k in report):
        return _count(report, "clipped_steps")
    return None


def _finite_or_inf(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(np.isfinite(x), x, np.inf)


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.median(vals)) if vals else None


def summarize_chain(run: runner.TaskRun, c: int) -> dict[str, Any]:
    """Statistics of chain ``c`` of ``run`` over its seeds (see :data:`CHAIN_KEYS`)."""
    task = run.task
    name = run.chains[c]
    final = _finite_or_inf(run.eval_loss[c, :, -1])
    diverged = task.diverged(final)
    with np.errstate(invalid="ignore"):
        q25, q50, q75 = np.percentile(final, [25, 50, 75])
    solved_mask = run.eval_loss[c] <= task.solved_loss  # [seeds, evals]
    solved = solved_mask.any(axis=-1)
    first = [int(run.eval_steps[np.argmax(row)]) for row in solved_mask[solved]]
    reports = run.health[c]
    skipped = [skipped_steps(r) for r in reports]
    clipped = [clipped_steps(r) for r in reports]
    if name == "clip_global_norm":
        clipped = list(np.sum(run.grad_norm[c] > task.clip_norm, axis=-1).astype(float))
    metric = run.eval_metric[c, :, -1]
    return {
        "description": chains_lib.get_chain(name).describe(task),
        "final_loss_median": float(q50),
        "final_loss_q25": float(q25),
        "final_loss_q75": float(q75),
        "final_metric_median": float(np.median(_finite_or_inf(metric))),
        "diverged_rate": float(np.mean(diverged)),
        "diverged_seeds": int(np.sum(diverged)),
        "solved_seeds": int(np.sum(solved)),
        "steps_to_solve_median": float(np.median(first)) if first else None,
        "skipped_steps_median": _median(skipped),
        "clipped_steps_median": _median(clipped),
        "grad_norm_max_median": float(
            np.median(np.max(_finite_or_inf(run.grad_norm[c]), axis=-1))
        ),
        "final_loss_per_seed": [float(v) for v in final],
    }


def summarize(
    runs: Sequence[runner.TaskRun], settings: dict[str, Any]
) -> dict[str, Any]:
    """The whole ``results.json`` document (non-finite numbers become ``null``)."""
    tasks = {}
    for run in runs:
        t = run.task
        tasks[t.name] = {
            "title": t.title,
            "optimizer": t.optimizer,
            "lr": run.lr,
            "steps": run.steps,
            "seeds": run.seeds,
            "metric": t.metric,
            "baseline_loss": t.baseline,
            "solved_loss": t.solved_loss,
            "diverged_loss": t.diverged_loss,
            "solved_definition": t.solved_text,
            "diverged_definition": t.diverged_text,
            "seconds": run.seconds,
            "eval_every": int(run.eval_steps[0]),
            "chains": {n: summarize_chain(run, c) for c, n in enumerate(run.chains)},
        }
    return jsonable({"settings": settings, "tasks": tasks})


def jsonable(x: Any) -> Any:
    """``x`` with every non-finite float (nested in dicts and lists) as ``None``."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(results: dict[str, Any], path: str) -> None:
    """Writes ``results`` as strict JSON (no NaN/Infinity literals)."""
    with open(path, "w") as f:
        json.dump(results, f, indent=2, allow_nan=False)
        f.write("\n")


# ---------------------------------------------------------------- formatting
def _num(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "inf"
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}" if abs(x) >= 1 else f"{x:.{digits}f}"


def _count_cell(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


#: Column headers of the results table.
HEADERS = (
    "chain",
    "test loss",
    "IQR",
    "metric",
    "diverged",
    "solved",
    "to solve",
    "skipped",
    "clipped",
)


def rows(task_result: dict[str, Any]) -> list[tuple[str, ...]]:
    """Table rows of one task of :func:`summarize`'s output.

    Columns: chain, median final test loss, its interquartile range, median
    final metric, diverged seeds, solved seeds, median steps to solve (over
    the solved seeds), median skipped and clipped steps.
    """
    out = []
    for name, r in task_result["chains"].items():
        n = len(r["final_loss_per_seed"])
        steps = r["steps_to_solve_median"]
        out.append(
            (
                name,
                _num(r["final_loss_median"]),
                f"[{_num(r['final_loss_q25'])}, {_num(r['final_loss_q75'])}]",
                _num(r["final_metric_median"]),
                f"{r['diverged_seeds']}/{n}",
                f"{r['solved_seeds']}/{n}",
                "-" if steps is None else f"{steps:.0f}",
                _count_cell(r["skipped_steps_median"]),
                _count_cell(r["clipped_steps_median"]),
            )
        )
    return out


def task_caption(name: str, t: dict[str, Any]) -> str:
    """One line naming the task, its optimizer and its settings."""
    return (
        f"{name}: {t['title']}; {t['optimizer']} lr={t['lr']:g}, "
        f"{t['steps']} steps, {t['seeds']} seeds; metric = {t['metric']}"
    )


def print_table(results: dict[str, Any], console: Any) -> None:
    """Prints one rich table per task to ``console``."""
    from rich.table import Table
    from rich.text import Text

    for name, t in results["tasks"].items():
        table = Table(title=task_caption(name, t), title_justify="left")
        for i, h in enumerate(HEADERS):
            table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
        for row in rows(t):
            style = None if row[4].startswith("0/") else "red"
            table.add_row(*(Text(cell) for cell in row), style=style)
        console.print(table)
        console.print(
            f"  test loss: median over seeds of the final test loss; metric: "
            f"median final {t['metric']}\n"
            f"  solved: {t['solved_definition']}; to solve: median first step "
            f"(evaluated every {t['eval_every']} steps)\n"
            f"  diverged: {t['diverged_definition']}\n"
            "  skipped / clipped: median steps counted by health_report "
            "('-': no such counter)\n"
        )


def _heading(settings: dict[str, Any], what: str) -> list[str]:
    s = settings
    return [
        f"# optax-stab demo {what}",
        "",
        f"Command: `{s['command']}`  ",
        f"optax_stab {s['version']}, jax {s['jax']}; wall time {s['seconds']:.0f} s.",
        "",
    ]


def markdown(results: dict[str, Any]) -> str:
    """``results.md``: the settings, and per task a Markdown table and definitions."""
    lines = [
        *_heading(results["settings"], "results"),
        "Every chain is `stabiliser, then the task's base optimizer`; all chains of a",
        "task share each seed's initial parameters and minibatches. Statistics are",
        "over seeds, on the final test loss (NaN/Inf counts as +inf). `skipped` and",
        "`clipped` are median step counts from `optax_stab.health_report` (`-`: the",
        "chain keeps no such counter).",
        "",
    ]
    for name, t in results["tasks"].items():
        lines += [f"## {task_caption(name, t)}", ""]
        lines.append("| " + " | ".join(HEADERS) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows(t)]
        lines += [
            "",
            f"- test loss: median over seeds of the final test loss, IQR its "
            f"interquartile range; metric: median final {t['metric']}",
            f"- solved: {t['solved_definition']}; to solve: median first step at "
            f"which a seed was solved (test set scored every {t['eval_every']} steps)",
            f"- diverged: {t['diverged_definition']}",
            "- chains: "
            + "; ".join(
                f"`{n}` = `{c['description']}`" for n, c in t["chains"].items()
            ),
            "",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------- --sweep
SWEEP_NOTE = (
    "LR sensitivity (Wortsman et al. 2023): mean over the learning-rate grid of "
    "min(mean final test loss over seeds, loss at init) minus the best such loss "
    "of any chain at any learning rate; NaN/Inf counts as the loss at init; "
    "lower is better. In brackets: fraction of the grid's runs (learning rates "
    "x seeds) that diverged."
)


def sweep_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the sensitivity table: one row per chain, one column
    per task, each cell ``sensitivity (diverged fraction)``."""
    tasks = results["sweep"]
    headers = ["chain", *tasks]
    chains: list[str] = []
    for t in tasks.values():
        chains += [c for c in t["chains"] if c not in chains]
    out = []
    for c in chains:
        row = [c]
        for t in tasks.values():
            r = t["chains"].get(c)
            row.append(
                "-"
                if r is None
                else f"{_num(r['lr_sensitivity'])} ({r['diverged_fraction']:.0%})"
            )
        out.append(row)
    return headers, out


def sweep_caption(name: str, t: dict[str, Any]) -> str:
    """One line naming a swept task, its grid and the best run."""
    grid = ", ".join(f"{lr:g}" for lr in t["lrs"])
    return (
        f"{name}: {t['title']}; {t['optimizer']} at lr {grid}; {t['steps']} steps, "
        f"{t['seeds']} seeds; loss at init {_num(t['loss_at_init'])}, best "
        f"{_num(t['best_loss'])} ({t['best_chain']} at lr {t['best_lr']:g})"
    )


def print_sweep_table(results: dict[str, Any], console: Any) -> None:
    """Prints the LR-sensitivity table and each task's grid to ``console``."""
    from rich.table import Table

    headers, body = sweep_rows(results)
    table = Table(title="LR sensitivity (diverged fraction)", title_justify="left")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for row in body:
        table.add_row(*row)
    console.print(table)
    console.print(f"  {SWEEP_NOTE}")
    for name, t in results["sweep"].items():
        console.print(f"  {sweep_caption(name, t)}")
    console.print()


def sweep_markdown(results: dict[str, Any]) -> str:
    """``results.md`` of a sweep: the settings, the LR-sensitivity table, the grids."""
    headers, body = sweep_rows(results)
    lines = [
        *_heading(results["settings"], "learning-rate sweep"),
        "## LR sensitivity (diverged fraction)",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|",
        *("| " + " | ".join(row) + " |" for row in body),
        "",
        SWEEP_NOTE,
        "",
    ]
    for name, t in results["sweep"].items():
        lines += [
            f"- {sweep_caption(name, t)}; diverged: {t['diverged_definition']}",
        ]
    lines.append("")
    return "\n".join(lines)
