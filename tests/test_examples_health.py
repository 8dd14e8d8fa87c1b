"""examples/gradient_health.py runs in quick mode and its diagnoses hold."""

from __future__ import annotations

import math

from tests import _examples


def test_gradient_health_diagnoses_vanishing_and_exploding(capsys):
    example = _examples.load_example("gradient_health")
    results = example.main(["--quick"])
    out = capsys.readouterr().out
    assert "2-layer MLP on diabetes" in out and "health_report" in out

    # Part 1: both optimisers beat the constant predictor (standardised target:
    # 1.0 is its variance, 0.8 the test split's MSE of predicting the mean).
    # Margins: the data, the threefry init and the batch order are the same
    # on every CPU and the small-rate runs are smooth, so CPUs differ only by
    # rounding; both land at 0.57-0.59, 10-15% under the bounds.
    mlp = results["mlp"]
    assert all(math.isfinite(v) for v in mlp.values())
    assert 0.7 < mlp["baseline_test_mse"] < 1.2
    assert mlp["sgd"] < 0.65 and mlp["sgd"] < 0.8 * mlp["baseline_test_mse"]
    assert mlp["adam"] < 0.8 * mlp["baseline_test_mse"]

    deep = results["deep"]
    assert results["finite"]
    for r in deep.values():
        numbers = [*r["kernel_grad_norms"], *r["bias_grad_norms"]]
        numbers += [r["grad_norm_first"], r["grad_norm_last"], r["final_loss"]]
        assert all(math.isfinite(v) for v in numbers)
    tiny, xavier, he, large = (deep[f"tanh {name}"] for name in example.INITS)

    # Too-small init: the report flags the early layers (and every kernel);
    # the gradients sit a dozen decades below Xavier's and nothing trains.
    assert {"Dense_0/kernel", "Dense_0/bias", "Dense_1/bias"} <= set(tiny["vanishing"])
    assert {"Dense_0/kernel", "Dense_0/bias"} <= set(tiny["vanishing_end"])
    # ~1e-19 against ~1e-1: the 0.06-per-layer shrinkage over 16 layers, not
    # a tuned margin (12 of the ~18 decades).
    assert max(tiny["kernel_grad_norms"]) < 1e-12 * min(xavier["kernel_grad_norms"])
    assert abs(tiny["final_loss"] - tiny["initial_loss"]) < 1e-3

    # Xavier and He: nothing vanishing or exploding, even layers, loss falls.
    # Xavier's init keeps the per-layer gradient norms within a factor ~3
    # (10x is the mechanism's bound with slack); the 60 smooth small-rate
    # steps end at 0.30-0.47 (0.6 leaves 25%) from 0.79-1.44 at init.
    for r in (xavier, he):
        assert r["vanishing"] == [] and r["vanishing_end"] == []
        assert r["exploding_steps"] == 0
        norms = r["kernel_grad_norms"]
        assert max(norms) < 10 * min(norms)
        assert r["final_loss"] < 0.6 < r["initial_loss"]

    # Too-large init: gradients explode towards the input. The z-score flag
    # does not fire (the norm is huge from step 1, not a spike); the per-layer
    # norms and max_norm_seen show it, and training lags behind Xavier's.
    # Step-1 quantities are fixed by the (CPU-independent) threefry init up to
    # rounding, so their margins are the mechanism's: ~700x between the ends,
    # ~1e4x Xavier's norm, and an initial loss of ~1 + WIDTH (the output sums
    # 32 saturated +-1 units with N(0, 1) weights) against Xavier's ~1.
    k = large["kernel_grad_norms"]
    assert k[0] > 100 * k[-1]
    assert large["max_norm_seen"] > 1e3 * xavier["max_norm_seen"]
    assert large["exploding_steps"] == 0
    assert large["initial_loss"] > 10 * xavier["initial_loss"]
    # The 60 steps after it are chaotic (the norm thrashes between 1e2 and
    # 1e4, amplifying rounding differences): its final loss was 5.5x Xavier's
    # on one CPU and 1.76x on another (issue 10). Only the direction of the
    # lag is asserted, no factor tuned to one machine.
    assert large["final_loss"] > xavier["final_loss"]

    # Sigmoid (derivative <= 1/4) vanishes towards the input even with Xavier.
    sigmoid = deep["sigmoid xavier_normal"]
    assert "Dense_0/kernel" in sigmoid["vanishing"]
    assert "Dense_0/kernel" in sigmoid["vanishing_end"]
    assert f"Dense_{example.DEPTH - 1}/kernel" not in sigmoid["vanishing"]
    # sigmoid' <= 1/4 per layer over 15 layers with Xavier's unit gain:
    # 4^-15 ~ 1e-9 (1e-9 against ~4 here); 1e-6 leaves three decades.
    assert sigmoid["kernel_grad_norms"][0] < 1e-6 * sigmoid["kernel_grad_norms"][-1]
