"""The seed examples run in quick mode and do what their docstrings claim."""

from __future__ import annotations

import math

import numpy as np

from tests import _examples


def test_linear_regression_remedies(capsys):
    example = _examples.load_example("linear_regression")
    results = example.main(["--quick"])
    assert "diabetes linear regression" in capsys.readouterr().out
    stable, unstable = example.LRS
    optimum = results["least squares"][f"test_mse@{stable}"]
    recipes = [name for name in results if name != "least squares"]
    assert len(recipes) == 6
    # At the stable rate every recipe ends within a few percent of the optimum.
    for name in recipes:
        assert results[name][f"test_mse@{stable}"] < 1.06 * optimum, name
    # Past the stability limit plain SGD diverges and the decays do not save it.
    r = {name: results[name][f"test_mse@{unstable}"] for name in recipes}
    assert not math.isfinite(r["plain SGD"])
    assert not r["linear decay"] < 100 * optimum
    assert not r["inverse-sqrt decay"] < 100 * optimum
    # Value clipping and weight clipping keep training bounded.
    assert r["value clipping"] < 5 * optimum
    assert r["weight clip + decay"] < 20 * optimum
    # Weight clipping keeps every weight in its box, at both rates.
    for lr in example.LRS:
        assert results["weight clip + decay"][f"max_abs_w@{lr}"] <= example.W_MAX


def test_threshold_amplification_lifts_vanishing_layers(capsys):
    example = _examples.load_example("threshold_amplification")
    results = example.main(["--quick"])
    assert "per-layer gradient norms" in capsys.readouterr().out
    before, after = results["grad_norms"], results["amplified_norms"]
    # The gradients vanish towards the input: > 2 decades between the ends.
    assert before[0] < 1e-2 * before[-1]
    assert np.all(np.diff(np.log(before)) > 0)
    # sign-sqrt amplifies the small first layer, shrinks the large last one
    # and about halves the spread in decades.
    assert after[0] > 5 * before[0] and after[-1] < before[-1]
    assert results["spread_after"] < 0.6 * results["spread_before"]
    # Plain gradient descent does not beat the constant predictor; with the
    # amplification the loss falls well below it and the first layer trains.
    plain, amp = results["plain"], results["sign_sqrt"]
    assert plain["best_loss"] > 0.95 * results["target_variance"]
    assert amp["best_loss"] < 0.8 * plain["best_loss"]
    assert amp["moved"][0] > 10 * plain["moved"][0]
    # The article's comparators ran, each over its own grid, with finite
    # best losses and weight changes.
    comparators = results["comparators"]
    assert set(comparators) == {
        "rmsprop",
        "adagrad",
        "accumulation",
        "clip_value",
        "clip_global_norm",
    }
    for name in ["plain", "sign_sqrt", *comparators]:
        r = results[name]
        assert len(r["losses"]) == len(r["learning_rates"]) == 4, name
        assert r["best_lr"] in r["learning_rates"], name
        assert math.isfinite(r["best_loss"]), name
        assert np.all(np.isfinite(r["moved"])), name
    variance = results["target_variance"]
    # Global-norm clipping scales every layer alike and full-batch
    # accumulation is GD with fewer updates: both stay at the variance, as
    # plain GD does, and sign-sqrt beats them.
    for name in ("clip_global_norm", "accumulation"):
        assert results[name]["best_loss"] > 0.95 * variance, name
        assert amp["best_loss"] < 0.8 * results[name]["best_loss"], name
    # The per-coordinate methods all train well below the variance; RMSProp
    # and Adagrad (per-coordinate normalisation) beat sign-sqrt here.
    for name in ("rmsprop", "adagrad", "clip_value"):
        assert results[name]["best_loss"] < 0.8 * variance, name
    for name in ("rmsprop", "adagrad"):
        assert results[name]["best_loss"] < amp["best_loss"], name
