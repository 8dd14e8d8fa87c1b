"""Tests of ``optax-stab demo``: a --quick run writes every promised file; bad flags."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys

import jax
import optax
import pytest

import optax_stab
from optax_stab import _cli
from optax_stab.demo import chains as chains_lib
from optax_stab.demo import cli as demo_cli
from optax_stab.demo import report, tasks

TASK_KEYS = {
    "title",
    "optimizer",
    "lr",
    "steps",
    "seeds",
    "metric",
    "baseline_loss",
    "solved_loss",
    "diverged_loss",
    "solved_definition",
    "diverged_definition",
    "seconds",
    "eval_every",
    "chains",
}
# Fields that are legitimately null for a healthy chain: nothing solved, or no
# counter of that kind in the chain.
MAY_BE_NULL = {"steps_to_solve_median", "skipped_steps_median", "clipped_steps_median"}


def _check_results_json(results, task_names, chain_names):
    assert set(results["tasks"]) == set(task_names)
    assert results["settings"]["quick"] is True
    assert results["settings"]["seeds"] == TINY_SEEDS
    for task_name, task in results["tasks"].items():
        assert set(task) == TASK_KEYS, task_name
        assert task["steps"] == TINY_STEPS
        assert list(task["chains"]) == list(chain_names)
        for chain_name, chain in task["chains"].items():
            assert set(chain) == set(report.CHAIN_KEYS), chain_name
            assert 0.0 <= chain["diverged_rate"] <= 1.0
            if chain["diverged_seeds"] > 0:
                continue
            for key, value in chain.items():
                if (key in MAY_BE_NULL and value is None) or key == "description":
                    continue
                values = value if isinstance(value, list) else [value]
                assert all(
                    isinstance(v, int | float) and math.isfinite(v) for v in values
                ), (task_name, chain_name, key, value)


# The whole --quick demo takes minutes, nearly all of it compiling one program
# per task with every chain in it. These runs keep every chain and every task
# end to end (every chain on the cheapest task, every task with two chains),
# at a few steps and two seeds: the same code writes every file.
TINY_STEPS, TINY_SEEDS = 5, 2


def _tiny_run(tmp_path, tasks_arg, chains_arg=None):
    argv = ["--quick", "--steps", str(TINY_STEPS), "--seeds", str(TINY_SEEDS)]
    argv += ["--tasks", tasks_arg, "--out", str(tmp_path)]
    if chains_arg is not None:
        argv += ["--chains", chains_arg]
    return demo_cli.demo(argv)


def _check_files(tmp_path, task_names, chain_names, returned):
    expected = ["divergence.png", "results.json", "results.md"]
    for name in task_names:
        expected += [f"loss_{name}.png", f"grad_norm_{name}.png"]
    for name in expected:
        path = tmp_path / name
        assert path.is_file(), name
        assert path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    with open(tmp_path / "results.json") as f:
        results = json.load(f)  # strict JSON: NaN/Infinity would not parse back
    assert results == json.loads(json.dumps(returned))
    _check_results_json(results, task_names, chain_names)

    text = (tmp_path / "results.md").read_text()
    assert text.count("| chain | test loss |") == len(task_names)
    for name in chain_names:
        assert f"| {name} |" in text


def test_every_chain_runs_end_to_end_and_writes_every_file(tmp_path):
    chains = chains_lib.CHAIN_NAMES
    returned = _tiny_run(tmp_path, "linear", "all")
    _check_files(tmp_path, ["linear"], chains, returned)


@pytest.mark.parametrize("task", tasks.TASK_NAMES)
def test_every_task_runs_end_to_end_and_writes_every_file(tmp_path, task):
    # One task per test, so the two xdist workers share the compile-heavy ones.
    chains = ["plain", "clip_by_norm"]
    returned = _tiny_run(tmp_path, task, ",".join(chains))
    _check_files(tmp_path, [task], chains, returned)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--chains", "nope"], "unknown chain 'nope'"),
        (["--chains", " , "], "--chains is empty"),
        (["--tasks", "adding,nope"], "unknown task 'nope'"),
        (["--seeds", "0"], "--seeds must be a positive integer"),
        (["--steps", "ten"], "--steps must be a positive integer"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--lr", "mnist=0.1"], "--lr expects a number or 'task=number,...'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        _cli.main(["demo", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_every_chain_builds_for_every_task():
    for name in tasks.TASK_NAMES:
        task = tasks.get_task(name)
        for chain in chains_lib.CHAINS:
            tx = chain.build(task, task.lr)
            assert isinstance(tx, optax.GradientTransformation), (name, chain.name)
            assert task.optimizer in chain.describe(task), (name, chain.name)


def test_console_script_entry_point_help_and_errors():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-c", "import sys, optax_stab._cli as c; sys.exit(c.main())"]
    help_run = subprocess.run(
        [*cmd, "demo", "--help"], capture_output=True, text=True, env=env
    )
    assert help_run.returncode == 0
    for word in (
        "--tasks",
        "--chains",
        "--seeds",
        "--steps",
        "--lr",
        "--quick",
        "--sweep",
        "--out",
    ):
        assert word in help_run.stdout
    assert "test MSE < 0.01" in help_run.stdout  # the adding problem's "solved"
    bad = subprocess.run(
        [*cmd, "demo", "--seeds", "x"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("optax-stab demo: error: --seeds")


def test_skipped_and_clipped_counts_from_health_report_keys():
    # spike_guard counts its non-finite steps in spike_steps too.
    assert report.skipped_steps({"spike_steps": 3.0, "nonfinite_steps": 2.0}) == 3.0
    # guard_nonfinite: non-finite steps it applied anyway were not skipped.
    guard = {"nonfinite_steps": 5.0, "applied_nonfinite_steps": 1.0}
    assert report.skipped_steps(guard) == 4.0
    assert report.skipped_steps({"pre_clip_norm": 1.0}) is None
    two_clippers = {"0/clipped_steps": 2.0, "1/clipped_steps": 5.0}
    assert report.clipped_steps(two_clippers) == 7.0
    assert report.clipped_steps({"spike_steps": 1.0}) is None


def test_learning_rate_flag_accepts_one_number_or_per_task_values():
    parser = demo_cli.build_parser()
    plan = demo_cli.resolve(parser.parse_args(["--lr", "0.1", "--tasks", "linear"]))
    assert plan["lrs"] == {"linear": 0.1}
    plan = demo_cli.resolve(parser.parse_args(["--lr", "adding=0.3,linear=0.2"]))
    assert plan["lrs"] == {"adding": 0.3, "linear": 0.2}
    assert plan["seeds"] == demo_cli.DEFAULT_SEEDS and plan["steps"] is None


def test_each_chain_description_is_the_code_that_builds_it():
    # The printed chain, evaluated as Python with the task's base optimizer at
    # the same learning rate, gives the same updates as the built chain.
    import jax.numpy as jnp
    import numpy as np
    import optax

    lr = 0.1
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3)}
    grads = [
        {"w": jnp.full((2, 3), 0.5), "b": jnp.arange(3.0)},
        {"w": jnp.full((2, 3), -2.0), "b": jnp.ones(3)},
    ]
    for task_name in tasks.TASK_NAMES:
        task = tasks.get_task(task_name)
        namespace = {n: getattr(optax_stab, n) for n in optax_stab.__all__}
        namespace |= {"optax": optax, "chain": optax.chain}
        base = task.optimizer.split("(")[0]  # "sgd" or "sgd(momentum=0.9)"
        if base == task.optimizer:
            namespace[base] = task.make_optimizer(lr)
        else:
            namespace[base] = functools.partial(getattr(optax, base), lr)
        for chain in chains_lib.CHAINS:
            printed = eval(chain.describe(task), namespace)
            built = chain.build(task, lr)
            states = [tx.init(params) for tx in (printed, built)]
            for g in grads:
                out = []
                for i, tx in enumerate((printed, built)):
                    u, states[i] = tx.update(g, states[i], params, loss=jnp.float32(1))
                    out.append(u)
                for a, b in zip(*(jax.tree.leaves(u) for u in out)):
                    np.testing.assert_array_equal(a, b, err_msg=chain.name)


def test_default_chains_leave_out_the_stabilize_variants_and_the_sweep_adds_them():
    parser = demo_cli.build_parser()
    plain = demo_cli.resolve(parser.parse_args([]))["chains"]
    swept = demo_cli.resolve(parser.parse_args(["--sweep"]))["chains"]
    assert plain == list(chains_lib.DEFAULT_CHAINS) and "recommended" in plain
    assert not any(n.startswith("stabilize_") for n in plain)
    assert swept == list(chains_lib.SWEEP_CHAINS)
    assert {"stabilize_global", "stabilize_noclip", "stabilize_adagc"} <= set(swept)
