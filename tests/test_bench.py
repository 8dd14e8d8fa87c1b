"""Tests of ``optax-stab bench``: bad arguments and tiny real runs (no targets)."""

import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_stab import _bench, _bench_cases, _cli
from tests import _examples

STEP_CASES = {
    "stream x = 0.5*x + 0.5",
    "the same stream, leaf by leaf",
    "optax.ema(0.9)",
    "ema_smoothing(0.9)",
    "spike_clip()",
    "moving_average(5)",
    "moving_average(9)",
    "windowed_median(5)",
    "windowed_median(9)",
    "optax.adam + apply",
    "guard_nonfinite(adam) + apply",
    "spike_guard(adam) + apply",
    "spike_guard(zscore_clip,adam) + apply",
    "health,adam + apply",
    "clip_by_norm,adam + apply",
    "health,clip_by_norm,adam + apply",
    "optax.clip_by_global_norm(1)",
    "clip_by_norm(1.0)",
    "zscore_clip()",
    "sign_sqrt_amplification()",
    "median network, ring of 9",
    "jnp.median, ring of 9",
    "optax.ema(0.9) [RA]",
    "spike_clip() [RA]",
    "optax.adam + apply [RA]",
    "guard_nonfinite(adam) + apply [RA]",
    "spike_guard(adam) + apply [RA]",
    "spike_guard(zscore_clip,adam) + apply [RA]",
}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "0"], "argument --size: must be a positive integer, got '0'"),
        (["--size", "-3"], "argument --size: must be a positive integer, got '-3'"),
        (["--repeats", "0"], "argument --repeats: must be a positive integer"),
        (["--leaves", "0"], "argument --leaves: must be a positive integer"),
        (["--size", "8", "--leaves", "9"], "--leaves (9) must be at most --size (8)"),
        (["--leaves", "ten"], "argument --leaves: must be a positive integer"),
        (["--compile-leaves", "4,x"], "argument --compile-leaves: must be comma"),
        (["--json", "/nonexistent/rows.json"], "--json: folder /nonexistent"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        _cli.main(["bench", *argv])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("optax-stab bench: error: ")
    assert message in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def _check_quartiles(row, key):
    low, high = row[f"{key}_iqr"]
    assert 0 < low <= row[key] <= high


def test_tiny_run_times_every_case_against_its_twin(tmp_path, capsys):
    path = tmp_path / "rows.json"
    argv = ["--size", "4096", "--leaves", "4", "--repeats", "3", "--json", str(path)]
    rows = _bench.main(argv)
    steps = {r["case"]: r for r in rows if r["kind"] == "step"}
    assert set(steps) == STEP_CASES
    for row in steps.values():
        assert row["donated"], row["case"]
        _check_quartiles(row, "ms")
        _check_quartiles(row, "x_roofline")
        if row["twin"] is not None:
            assert row["twin"] in steps
            _check_quartiles(row, "x_twin")
    # XLA's bytes of the one-kernel stream: read x, write x, 4 bytes each.
    assert steps["stream x = 0.5*x + 0.5"]["hlo_bytes"] == 2 * 4 * 4096
    assert all(row["hlo_bytes"] > 0 for row in steps.values())
    assert steps["ema_smoothing(0.9)"]["twin"] == "optax.ema(0.9)"
    assert steps["spike_guard(adam) + apply"]["twin"] == "optax.adam + apply"
    assert steps["spike_clip() [RA]"]["twin"] == "optax.ema(0.9) [RA]"
    targets = [r for r in rows if r["kind"] == "target"]
    assert len(targets) == 12
    for row in targets:
        _check_quartiles(row, "ratio")
        assert row["ok"] == (row["low"] <= row["ratio"] <= row["high"])
        assert row["hlo_ratio"] > 0
    assert {"kind": "check", "case": "median network == jnp.median", "ok": True} in rows
    assert json.loads(path.read_text()) == rows
    out = capsys.readouterr().out
    assert "command: optax-stab bench --size 4096" in out
    assert "PASS" in out or "MISS" in out


def test_tiny_compile_table(capsys, no_compilation_cache):
    rows = _bench.main(["--compile", "--compile-leaves", "8,4"])
    by_name = {r["case"]: r for r in rows}
    assert {"optax.ema(0.9)", "optax.adam(1e-3)", "spike_guard(adam)"} <= set(by_name)
    for row in rows:
        assert row["leaves"] == [4, 8]
        assert all(s > 0 for s in row["seconds"])
        if row["twin"] is not None:
            assert row["twin_seconds"] == by_name[row["twin"]]["seconds"]
            assert row["growth"] == pytest.approx(row["seconds"][1] / row["seconds"][0])
            assert row["growth_max"] == pytest.approx(2.5)
        per_leaf = row["per_leaf"]
        assert per_leaf["ops"] > 0 and per_leaf["kernels"] > 0.5, row["case"]
    out = capsys.readouterr().out
    assert "growth 4->8" in out
    assert "per leaf (HLO at 8 and 24 leaves)" in out


class _PerLeaf(optax.GradientTransformation):
    """Scales leaf i by ``scales(i)``: a stateless update, one kernel per leaf."""

    def __new__(cls, scales):
        def update(updates, state, params=None):
            del params
            return [x * scales(i) for i, x in enumerate(updates)], state

        return super().__new__(cls, lambda p: optax.EmptyState(), update)


def test_hlo_counts_tell_shared_kernels_from_leaf_specific_ones():
    # Every leaf scaled by 2: one kernel per leaf, all the same computation.
    # Leaf i scaled by i + 2: the constant makes every kernel its own.
    shared = [_bench_cases.hlo_counts(_PerLeaf(lambda i: 2.0), n) for n in (4, 12)]
    own = [_bench_cases.hlo_counts(_PerLeaf(lambda i: i + 2.0), n) for n in (4, 12)]
    for a, b in (shared, own):
        assert b["kernels"] - a["kernels"] == 8
        assert b["ops"] > a["ops"]
    assert shared[1]["distinct"] == shared[0]["distinct"] == 1
    assert own[0]["distinct"] == 4 and own[1]["distinct"] == 12


def test_floors_compute_what_the_transforms_compute(capsys):
    # benchmarks/floors.py compares each transform with its algorithm written
    # bare in plain JAX; the comparison means something only if both compute
    # the same outputs on finite gradients (after the median's warm-up).
    floors = _examples.load_example("floors", _examples.BENCHMARKS)
    floors.check_floors()
    assert "floors match ours" in capsys.readouterr().out
    # The bare moving average is an independent reference: a window of 3.
    tx = floors.moving_average_floor(3)
    state = tx.init(jnp.zeros(1))
    outs = []
    for g in (1.0, 2.0, 6.0, 10.0):
        u, state = tx.update(jnp.array([g]), state)
        outs.append(float(u[0]))
    np.testing.assert_allclose(outs, [1.0, 1.5, 3.0, 6.0], rtol=1e-6)
