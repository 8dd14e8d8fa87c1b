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
    assert max(tiny["kernel_grad_norms"]) < 1e-12 * min(xavier["kernel_grad_norms"])
    assert abs(tiny["final_loss"] - tiny["initial_loss"]) < 1e-3

    # Xavier and He: nothing vanishing or exploding, even layers, loss falls.
    for r in (xavier, he):
        assert r["vanishing"] == [] and r["vanishing_end"] == []
        assert r["exploding_steps"] == 0
        norms = r["kernel_grad_norms"]
        assert max(norms) < 10 * min(norms)
        assert r["final_loss"] < 0.6 < r["initial_loss"]

    # Too-large init: gradients explode towards the input. The z-score flag
    # does not fire (the norm is huge from step 1, not a spike); the per-layer
    # norms and max_norm_seen show it, and training lags behind Xavier's.
    k = large["kernel_grad_norms"]
    assert k[0] > 100 * k[-1]
    assert large["max_norm_seen"] > 1e3 * xavier["max_norm_seen"]
    assert large["exploding_steps"] == 0
    assert large["final_loss"] > 2 * xavier["final_loss"]

    # Sigmoid (derivative <= 1/4) vanishes towards the input even with Xavier.
    sigmoid = deep["sigmoid xavier_normal"]
    assert "Dense_0/kernel" in sigmoid["vanishing"]
    assert "Dense_0/kernel" in sigmoid["vanishing_end"]
    assert f"Dense_{example.DEPTH - 1}/kernel" not in sigmoid["vanishing"]
    assert sigmoid["kernel_grad_norms"][0] < 1e-6 * sigmoid["kernel_grad_norms"][-1]
