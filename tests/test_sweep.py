"""Tests of ``optax-stab demo --sweep``: LR sensitivity, a tiny sweep, bad flags."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from optax_stab import _cli
from optax_stab.demo import cli as demo_cli
from optax_stab.demo import sweep, tasks

CHAINS = ("plain", "clip_global_norm")
STEPS, SEEDS = 5, 2


def test_lr_sensitivity_matches_hand_computed_example():
    # [chains=2, lrs=3, seeds=2]; loss at init 2.
    final = np.array(
        [
            [[0.5, 0.7], [0.3, 0.5], [np.nan, 1.0]],  # means 0.6, 0.4, (2+1)/2
            [[1.0, 1.0], [0.2, 0.4], [np.inf, 7.0]],  # means 1.0, 0.3, (2+7)/2
        ]
    )
    # Capped at the loss at init: [0.6, 0.4, 1.5] and [1.0, 0.3, 2.0]; the
    # best of any chain at any lr is 0.3.
    expected_capped = np.array([[0.6, 0.4, 1.5], [1.0, 0.3, 2.0]])
    np.testing.assert_allclose(sweep.capped_loss(final, 2.0), expected_capped)
    expected = [(0.3 + 0.1 + 1.2) / 3, (0.7 + 0.0 + 1.7) / 3]
    np.testing.assert_allclose(sweep.lr_sensitivity(final, 2.0), expected)


def test_lr_sensitivity_is_zero_for_the_chain_best_at_every_lr():
    final = np.array([[[0.1], [0.2]], [[0.3], [0.4]]])
    np.testing.assert_allclose(sweep.lr_sensitivity(final, 1.0), [0.05, 0.25])


def test_tiny_sweep_writes_plot_table_and_json(tmp_path):
    argv = ["--sweep", "--quick", "--tasks", "linear", "--chains", ",".join(CHAINS)]
    argv += ["--seeds", str(SEEDS), "--steps", str(STEPS), "--out", str(tmp_path)]
    returned = demo_cli.demo(argv)

    png = tmp_path / "lr_sweep_linear.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "results.json") as f:
        results = json.load(f)  # strict JSON
    assert results == json.loads(json.dumps(returned))
    task = tasks.get_task("linear")
    grid = task.sweep_lrs
    t = results["sweep"]["linear"]
    # --quick: the grid's two ends and its middle.
    assert t["lrs"] == [grid[0], grid[len(grid) // 2], grid[-1]]
    assert t["steps"] == STEPS and t["seeds"] == SEEDS
    assert list(t["chains"]) == list(CHAINS)
    final = np.array(
        [t["chains"][c]["final_loss_per_run"] for c in CHAINS], dtype=np.float64
    )  # None (NaN/Inf) becomes nan
    assert final.shape == (len(CHAINS), 3, SEEDS)
    np.testing.assert_allclose(
        [t["chains"][c]["lr_sensitivity"] for c in CHAINS],
        sweep.lr_sensitivity(final, t["loss_at_init"]),
        rtol=1e-6,
    )
    diverged = task.diverged(final).mean(axis=(1, 2))
    np.testing.assert_allclose(
        [t["chains"][c]["diverged_fraction"] for c in CHAINS], diverged
    )

    # Each learning rate of the sweep is the plain demo at that learning rate:
    # the same seeds' initial parameters and batches, trained on their own.
    lr = t["lrs"][1]
    argv = ["--tasks", "linear", "--chains", ",".join(CHAINS), "--lr", str(lr)]
    argv += ["--seeds", str(SEEDS), "--steps", str(STEPS), "--out", str(tmp_path / "d")]
    single = demo_cli.demo(argv)
    for c, name in enumerate(CHAINS):
        np.testing.assert_allclose(
            final[c, 1],
            single["tasks"]["linear"]["chains"][name]["final_loss_per_seed"],
            rtol=1e-5,
        )

    text = (tmp_path / "results.md").read_text()
    assert "| chain | linear |" in text
    for name in CHAINS:
        assert f"| {name} | " in text


def test_default_tasks_of_the_demo_and_of_the_sweep():
    parser = demo_cli.build_parser()
    plan = demo_cli.resolve(parser.parse_args([]))
    assert plan["tasks"] == list(tasks.DEFAULT_TASKS) and not plan["sweep"]
    plan = demo_cli.resolve(parser.parse_args(["--sweep"]))
    assert plan["tasks"] == [n for n in tasks.TASK_NAMES if tasks.get_task(n).sweep_lrs]
    assert plan["seeds"] == demo_cli.SWEEP_SEEDS
    for name in plan["tasks"]:
        grid = np.asarray(tasks.get_task(name).sweep_lrs)
        assert len(grid) >= 5 and grid[-1] / grid[0] >= 30, name
        assert np.all(np.diff(grid) > 0), name


def _bad(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _cli.main(["demo", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_sweep_with_lr_is_a_one_line_error(capsys):
    err = _bad(["--sweep", "--lr", "0.1"], capsys)
    assert "--lr cannot be combined with --sweep" in err


def test_sweep_of_a_task_without_grid_is_a_one_line_error(capsys, monkeypatch):
    get_task = tasks.get_task
    linear = dataclasses.replace(get_task("linear"), sweep_lrs=())
    monkeypatch.setattr(
        tasks, "get_task", lambda n: linear if n == "linear" else get_task(n)
    )
    err = _bad(["--sweep", "--tasks", "adding,linear"], capsys)
    assert "task 'linear' has no learning-rate grid" in err
