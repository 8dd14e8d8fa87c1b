"""``optax-stab demo``: arguments, validation and the driver that ties it together."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any

import optax_stab
from optax_stab import _cli
from optax_stab.demo import chains as chains_lib
from optax_stab.demo import tasks as tasks_lib

DEFAULT_OUT = "./optax_stab_demo"
DEFAULT_SEEDS = 8
QUICK_SEEDS = 4
SWEEP_SEEDS = 4

DESCRIPTION = """\
A stability shoot-out: each task is trained under several optimizer chains
side by side, many seeds at once (one jax.jit'd, jax.vmap'd lax.scan per
task), at a learning rate where the plain optimizer is unstable. Prints a
results table and writes PNG plots, results.json and results.md to --out.

tasks:
  adding    adding problem (Hochreiter & Schmidhuber; Pascanu et al. 2013),
            T=100, GRU (16 units), SGD momentum 0.9, lr 0.4, 2000 steps.
            Solved: test MSE < 0.01 on 256 held-out sequences (6%% of the
            1/6 target variance).
  adding-lstm
            the same problem with an LSTM (nn.OptimizedLSTMCell, 16 units),
            Adam, lr 0.3, 1500 steps; swept by --sweep, not run by default.
  deep-mlp  scikit-learn digits, 12-layer ReLU MLP without normalisation,
            SGD momentum 0.9, lr 0.05. Solved: test cross-entropy < 0.25.
  linear    scikit-learn diabetes, linear regression on standardised data,
            SGD batch 8, lr 0.24. Solved: test MSE within 5%% of least squares.
  lm        Python's own documentation (pydoc_data.topics), character level:
            2-layer causal transformer (width 64, no QK-norm), AdamW b2=0.95
            wd=0.1, lr 0.03, 400 steps. Solved: < 2.8 nats/char; diverged:
            above the unigram cross-entropy. Swept by --sweep, not run by
            default.
A seed diverged when its final test loss is NaN/Inf or above a bound: 2x the
constant-predictor loss (adding, linear), 0.9x the chance-level loss
(deep-mlp, whose failure mode is a collapse to chance).

--sweep: learning-rate sensitivity (Wortsman et al. 2023). Every chain is
trained at every learning rate of each task's grid (one program per task),
and scored by the mean over the grid of min(final test loss, loss at init)
minus the best such loss of any chain at any learning rate (lower is better;
NaN/Inf counts as the loss at init). Writes lr_sweep_<task>.png and the table
to results.md/json. Default: every task with a grid, %(sweep_seeds)d seeds.
%(sweep_time)s

chains: %(chains)s
  (each is "stabiliser, then the task's base optimizer"; recommended =
  optax_stab.stabilize(base, max_norm=1), see its docstring;
  stabilize_global/noclip/adagc are stabilize(base, clip=...) variants)
"""


#: Measured time of ``optax-stab demo --sweep`` (see docs/demo.md).
SWEEP_TIME = (
    "Measured: 16 min 50 s for the 5 tasks x 10 chains x 5-6 learning rates x\n"
    "3 seeds (--seeds 3) on a 2-core CPU with nothing else running; the\n"
    "default 4 seeds take about 4/3 of that. --sweep --quick: 4 min 19 s."
)


def description() -> str:
    """The ``--help`` text above the flags."""
    names = textwrap.fill(", ".join(chains_lib.CHAIN_NAMES), 76, subsequent_indent="  ")
    return DESCRIPTION % {
        "chains": names,
        "sweep_seeds": SWEEP_SEEDS,
        "sweep_time": SWEEP_TIME,
    }


class ArgumentError(Exception):
    """A bad command-line value; the CLI prints it on one line and exits with 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the demo's flags to ``parser``."""
    parser.add_argument(
        "--tasks",
        default=None,
        help=f"comma-separated tasks to run, from {', '.join(tasks_lib.TASK_NAMES)} "
        f"(default: {','.join(tasks_lib.DEFAULT_TASKS)}; with --sweep every task "
        "with a learning-rate grid)",
    )
    parser.add_argument(
        "--chains",
        default=None,
        help="comma-separated chains to compare, or 'all' (default: "
        f"{','.join(chains_lib.DEFAULT_CHAINS[:3])},... all but the stabilize_* "
        "variants; with --sweep "
        f"{','.join(chains_lib.SWEEP_CHAINS)})",
    )
    parser.add_argument(
        "--seeds",
        default=None,
        help=f"seeds per chain, trained together with jax.vmap (default: "
        f"{DEFAULT_SEEDS}; {QUICK_SEEDS} with --quick or --sweep)",
    )
    parser.add_argument(
        "--steps",
        default=None,
        help="training steps for every task (default: each task's own, 2000 for "
        "adding, 1500 for adding-lstm, 1000 for the others; with --quick 100 for "
        "adding and adding-lstm, 200 for the others)",
    )
    parser.add_argument(
        "--lr",
        default=None,
        help="learning rate of the base optimizer: one number for every task, or "
        "per task as 'adding=0.1,linear=0.2' (default: each task's own, see above)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"short run (200 steps, {QUICK_SEEDS} seeds) for a smoke test; "
        "under a minute on a laptop CPU",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="learning-rate sweep: every chain at every learning rate of each "
        "task's grid (with --quick: 3 of them, the ends and the middle); "
        "writes lr_sweep_<task>.png and the LR-sensitivity table",
    )
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help="output folder for the plots, results.json and results.md "
        "(default: %(default)s)",
    )


def _names(value: str, known: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise ArgumentError(f"--{what} is empty; choose from {', '.join(known)}")
    for n in names:
        if n not in known:
            raise ArgumentError(
                f"unknown {what[:-1]} {n!r} in --{what}; choose from {', '.join(known)}"
            )
    return list(dict.fromkeys(names))


def _positive_int(value: str | None, flag: str) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise ArgumentError(
            f"{flag} must be a positive integer, got {value!r}"
        ) from None
    if n < 1:
        raise ArgumentError(f"{flag} must be a positive integer, got {value!r}")
    return n


def _positive_float(value: str, flag: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise ArgumentError(
            f"{flag} must be a positive number, got {value!r}"
        ) from None
    if not (x > 0 and x < float("inf")):
        raise ArgumentError(f"{flag} must be a positive number, got {value!r}")
    return x


def _learning_rates(value: str | None, tasks: Sequence[str]) -> dict[str, float]:
    if value is None:
        return {}
    if "=" not in value:
        lr = _positive_float(value, "--lr")
        return dict.fromkeys(tasks, lr)
    out = {}
    for part in value.split(","):
        name, sep, num = part.partition("=")
        name = name.strip()
        if not sep or name not in tasks_lib.TASK_NAMES:
            raise ArgumentError(
                f"--lr expects a number or 'task=number,...' with tasks from "
                f"{', '.join(tasks_lib.TASK_NAMES)}; got {part!r}"
            )
        out[name] = _positive_float(num, f"--lr {name}")
    return out


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Validates parsed flags into a plan.

    Raises:
        ArgumentError: On any bad value, with a one-line message.
    """
    sweep = bool(getattr(args, "sweep", False))
    if args.tasks is not None:
        task_names = _names(args.tasks, tasks_lib.TASK_NAMES, "tasks")
    elif sweep:
        task_names = [
            n for n in tasks_lib.TASK_NAMES if tasks_lib.get_task(n).sweep_lrs
        ]
    else:
        task_names = list(tasks_lib.DEFAULT_TASKS)
    if sweep:
        if args.lr is not None:
            raise ArgumentError(
                "--lr cannot be combined with --sweep (the sweep trains at every "
                "learning rate of each task's grid)"
            )
        for n in task_names:
            if not tasks_lib.get_task(n).sweep_lrs:
                raise ArgumentError(
                    f"task {n!r} has no learning-rate grid for --sweep; choose "
                    "tasks that have one"
                )
    if args.chains is None:
        chain_names = list(
            chains_lib.SWEEP_CHAINS if sweep else chains_lib.DEFAULT_CHAINS
        )
    elif args.chains.strip() == "all":
        chain_names = list(chains_lib.CHAIN_NAMES)
    else:
        chain_names = _names(args.chains, chains_lib.CHAIN_NAMES, "chains")
    seeds = _positive_int(args.seeds, "--seeds")
    if sweep:
        seeds = seeds or SWEEP_SEEDS
    else:
        seeds = seeds or (QUICK_SEEDS if args.quick else DEFAULT_SEEDS)
    steps = _positive_int(args.steps, "--steps")
    lrs = _learning_rates(args.lr, task_names)
    if not args.out:
        raise ArgumentError("--out must be a folder name")
    return {
        "tasks": task_names,
        "chains": chain_names,
        "seeds": seeds,
        "steps": steps,
        "lrs": lrs,
        "quick": bool(args.quick),
        "sweep": sweep,
        "out": args.out,
    }


def make_out_dir(out: str) -> None:
    """Creates the output folder ``out`` (and its parents) before any training.

    Raises:
        ArgumentError: If ``out`` is an existing file, lies under one, cannot be
            created (a missing or read-only parent, a pseudo file system such as
            ``/proc``) or is not writable, with a one-line message.
    """
    try:
        os.makedirs(out, exist_ok=True)
    except FileExistsError:
        raise ArgumentError(
            f"--out {out!r} is an existing file, not a folder"
        ) from None
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ArgumentError(
            f"--out {out!r}: cannot create the folder ({reason})"
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ArgumentError(f"--out {out!r}: the folder is not writable")


def train(plan: dict[str, Any], err_console: Any) -> list[Any]:
    """Trains every task of ``plan`` with a progress bar per task on stderr.

    Returns:
        One :class:`optax_stab.demo.runner.TaskRun` per task, in plan order
        (with ``plan["sweep"]``: one :class:`optax_stab.demo.sweep.SweepRun`).
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from optax_stab.demo import runner, sweep

    task_objs = [tasks_lib.get_task(n) for n in plan["tasks"]]
    runs = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console, transient=False) as progress:
        bars = {}
        for t in task_objs:
            steps = plan["steps"] or (t.quick_steps if plan["quick"] else t.steps)
            # Not started: each bar's clock starts when its task does.
            bars[t.name] = progress.add_task(
                f"{t.name:<11} (waiting)", total=steps, start=False
            )
        for t in task_objs:
            bar = bars[t.name]
            steps = int(progress.tasks[bar].total)
            label = f"{t.name:<11} {len(plan['chains'])} chains"
            if plan["sweep"]:
                lrs = sweep.grid(t, quick=plan["quick"])
                label += f" x {len(lrs)} lrs"
            label += f" x {plan['seeds']} seeds"
            progress.start_task(bar)
            progress.update(bar, description=f"{label} (compiling)")

            def on_progress(done, bar=bar, label=label):
                progress.update(bar, completed=done, description=label)

            if plan["sweep"]:
                run = sweep.train_sweep(
                    t,
                    plan["chains"],
                    lrs=lrs,
                    seeds=plan["seeds"],
                    steps=steps,
                    on_progress=on_progress,
                )
            else:
                run = runner.train_task(
                    t,
                    plan["chains"],
                    seeds=plan["seeds"],
                    steps=steps,
                    lr=plan["lrs"].get(t.name, t.lr),
                    on_progress=on_progress,
                )
            runs.append(run)
            progress.stop_task(bar)
    return runs


def write_outputs(
    runs: list[Any],
    plan: dict[str, Any],
    argv: Sequence[str] | None,
    console: Any,
    start: float,
) -> dict[str, Any]:
    """Prints the table and writes the plots, results.json and results.md.

    Returns:
        ``results.json``'s dict.
    """
    import jax

    from optax_stab.demo import plots, report, sweep

    out = plan["out"]
    command = "optax-stab demo" + ("" if not argv else " " + " ".join(argv))
    settings = {
        "command": command,
        "version": optax_stab.__version__,
        "jax": jax.__version__,
        "quick": plan["quick"],
        "sweep": plan["sweep"],
        "seeds": plan["seeds"],
        "chains": plan["chains"],
        "tasks": plan["tasks"],
        "seconds": 0.0,
    }
    if plan["sweep"]:
        results = report.jsonable(
            {
                "settings": settings,
                "sweep": {r.task.name: sweep.summarize(r) for r in runs},
            }
        )
        report.print_sweep_table(results, console)
        files = plots.write_sweeps(runs, out)
        markdown = report.sweep_markdown
    else:
        results = report.summarize(runs, settings)
        report.print_table(results, console)
        files = plots.write_all(runs, results, out)
        markdown = report.markdown
    results["settings"]["seconds"] = time.perf_counter() - start
    report.write_json(results, os.path.join(out, "results.json"))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(results))
    files += ["results.json", "results.md"]
    console.print(
        f"wall time {results['settings']['seconds']:.0f} s; wrote "
        f"{', '.join(files)} to {os.path.abspath(out)}"
    )
    return results


def run(plan: dict[str, Any], argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains (:func:`train`), then reports (:func:`write_outputs`).

    Returns:
        ``results.json``'s dict.
    """
    from rich.console import Console

    start = time.perf_counter()
    os.makedirs(plan["out"], exist_ok=True)
    console = Console() if sys.stdout.isatty() else Console(width=120)
    runs = train(plan, Console(stderr=True))
    return write_outputs(runs, plan, argv, console, start)


def build_parser(prog: str = "optax-stab demo") -> argparse.ArgumentParser:
    """A stand-alone parser for ``python -m optax_stab.demo``."""
    parser = _cli.OneLineErrorParser(
        prog=prog,
        description=description(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


def demo(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the demo with command-line ``argv``; returns ``results.json``'s dict.

    Raises:
        SystemExit: With code 2 and a one-line message on a bad flag or value.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = resolve(args)
        make_out_dir(plan["out"])
    except ArgumentError as e:
        parser.error(str(e))
    return run(plan, argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m optax_stab.demo``: runs :func:`demo`; returns the exit code 0."""
    demo(argv)
    return 0
