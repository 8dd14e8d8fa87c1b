"""Each Flax example runs in --quick mode and its claim holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np

import optax_stab
from tests import _examples


def test_linen_trainstate_guarded_chain_survives_corrupted_batches():
    example = _examples.load_example("linen_trainstate")
    results = example.main(["--quick"])
    stable, plain = results["stable"], results["plain"]
    report = optax_stab.health_report(stable["state"])
    corrupted = 200 // example.CORRUPT_EVERY
    assert report["spike_steps"] >= corrupted - 1  # at most one inside warm-up
    # Mechanism: the guarded run skips the corrupted batches and trains as a
    # clean run does (0.95 on the 450 held-out digits here; a non-chaotic run,
    # so another CPU moves it by rounding, a few samples at most); the plain
    # run applies them, its parameters go NaN and it predicts one class
    # (chance, 0.11). 0.8 separates the two with room on both sides.
    assert stable["accuracy"] > 0.8
    assert plain["accuracy"] < stable["accuracy"] - 0.3
    assert np.all(np.isfinite(stable["losses"]))


def test_nnx_optimizer_loss_reaches_spike_guard_and_health_is_logged():
    example = _examples.load_example("nnx_optimizer")
    results = example.main(["--quick"])
    final = results["final"]
    assert final["spike_steps"] == results["injected_spikes"] == 5
    assert final["nonfinite_steps"] == 0
    assert [entry["step"] for entry in results["log"]] == [50, 100, 150, 200]
    for entry in results["log"]:
        assert {"grad_norm", "spike_steps", "loss"} <= set(entry)
    assert results["log"][-1]["spike_steps"] == 5
    # The target is standardised: 1.0 = predicting 0. A clean regression run
    # (0.42 here, smooth, so other CPUs differ by rounding) must learn.
    assert results["mse"] < 0.6


def test_checkpoint_resume_is_bit_identical():
    example = _examples.load_example("checkpoint_resume")
    results = example.main(["--quick"])
    resumed, uninterrupted = results["resumed"], results["uninterrupted"]
    assert int(resumed["step"]) == int(uninterrupted["step"]) == 100
    assert results["identical"]
    jax.tree.map(
        np.testing.assert_array_equal, resumed["params"], uninterrupted["params"]
    )
    jax.tree.map(
        np.testing.assert_array_equal, resumed["opt_state"], uninterrupted["opt_state"]
    )
    # The restored state really carries history: the guard's ring is full.
    report = optax_stab.health_report(resumed["opt_state"])
    assert report["accepted_steps"] + report["spike_steps"] == 100


def test_hyperparameter_sweep_equals_separate_runs():
    example = _examples.load_example("hyperparameter_sweep")
    results = example.main(["--quick"])
    swept = np.asarray(results["mse"])
    assert swept.shape == (16,)
    # Four of the 16 thresholds (each separate run is its own compile), from
    # tight to loose: vmapped matmuls sum in another order, so equal up to
    # float32 rounding.
    which = [0, 3, 9, 15]
    separate = example.separate_runs(results["steps"], which)
    np.testing.assert_allclose(swept[which], separate, rtol=1e-3)
    # And the sweep shows something: tight clipping converges, loose diverges.
    assert swept[3] < 0.6 < 10 < swept[-1]


# Runs each example as ``python examples/NAME.py --help`` would (its
# ``__main__`` block, which the tests above never reach: they import the file
# under another name), all in one interpreter; prints {name: [code, stdout]}.
AS_SCRIPTS = r"""
import contextlib, io, json, runpy, sys

results = {}
for path in sys.argv[1:]:
    out = io.StringIO()
    sys.argv = [path, "--help"]
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(path, run_name="__main__")
            code = None
        except SystemExit as e:
            code = e.code
    results[path] = [code, out.getvalue()]
print(json.dumps(results))
"""

FLAX_EXAMPLES = (
    "linen_trainstate",
    "nnx_optimizer",
    "checkpoint_resume",
    "hyperparameter_sweep",
)


def test_examples_run_as_scripts_and_take_the_quick_flag():
    paths = [str(_examples.EXAMPLES / f"{name}.py") for name in FLAX_EXAMPLES]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", AS_SCRIPTS, *paths],
        capture_output=True,
        text=True,
        env=env,
        cwd=_examples.EXAMPLES.parent,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    for path in paths:
        code, out = results[path]
        assert code == 0, path
        assert out.startswith("usage: ") and "--quick" in out, path
