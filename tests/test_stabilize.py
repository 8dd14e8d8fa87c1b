"""``stabilize``: the documented composition, its options and its errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_stab

PARAMS = {"w": jnp.zeros(4), "b": jnp.zeros(2)}


def _g(scale: float) -> dict[str, jnp.ndarray]:
    # Global norm exactly 3 * scale: sqrt(4 * 1 + 2 * 2.5) = 3.
    return {"w": scale * jnp.ones(4), "b": scale * jnp.full((2,), jnp.sqrt(2.5))}


def _run(tx, grads, losses=None):
    state = tx.init(PARAMS)
    out = []
    for i, g in enumerate(grads):
        loss = None if losses is None else jnp.float32(losses[i])
        u, state = tx.update(g, state, PARAMS, loss=loss)
        out.append(u)
    return out, state


def test_default_caps_the_norm_and_skips_a_nonfinite_step():
    tx = optax_stab.stabilize(optax.sgd(1.0), max_norm=1.5)
    nan = {"w": jnp.array([1.0, jnp.nan, 0.0, 0.0]), "b": jnp.zeros(2)}
    out, state = _run(tx, [_g(1.0), nan, _g(0.1)])
    # Norm 3 capped at 1.5: the sgd update is -g / 2; then a skip; then norm
    # 0.3 passes (ZClip is still warming up, below the cap).
    np.testing.assert_allclose(out[0]["w"], -0.5 * np.ones(4), rtol=1e-6)
    np.testing.assert_array_equal(out[1]["w"], np.zeros(4))
    np.testing.assert_allclose(out[2]["w"], -0.1 * np.ones(4), rtol=1e-6)
    assert int(state.nonfinite_steps) == 1 and int(state.spike_steps) == 1


def test_global_clip_without_guard_is_optax_clip_by_global_norm():
    grads = [_g(s) for s in (0.1, 2.0, 0.5, 7.0)]
    ours, _ = _run(
        optax_stab.stabilize(optax.adam(0.1), clip="global", guard="none"), grads
    )
    ref, _ = _run(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1)), grads)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6)
        np.testing.assert_allclose(a["b"], b["b"], rtol=1e-6)


@pytest.mark.parametrize("clip", ["none", "adagc"])
def test_nonfinite_guard_skips_a_nan_loss_and_keeps_the_inner_state(clip):
    tx = optax_stab.stabilize(
        optax.sgd(1.0, momentum=0.5), clip=clip, guard="nonfinite"
    )
    _, state = _run(tx, [_g(0.1), _g(0.1)], losses=[1.0, float("nan")])
    assert int(state.nonfinite_steps) == 1
    # One applied step: the momentum trace holds the first gradient only.
    np.testing.assert_allclose(
        optax.tree.get(state.inner_state, "trace")["w"], 0.1 * np.ones(4), rtol=1e-6
    )


def test_no_clip_no_guard_is_the_inner_optimizer():
    grads = [_g(s) for s in (1.0, 5.0)]
    ours, _ = _run(
        optax_stab.stabilize(optax.sgd(0.1), clip="none", guard="none"), grads
    )
    ref, _ = _run(optax.with_extra_args_support(optax.sgd(0.1)), grads)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a["w"], b["w"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"clip": "zclip"}, "clip"),
        ({"guard": "skip"}, "guard"),
        ({"max_norm": 0.0}, "max_norm"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"max_norm": float("nan")}, "max_norm"),
    ],
)
def test_bad_options_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optax_stab.stabilize(optax.sgd(0.1), **kwargs)


def test_a_non_transform_inner_raises_type_error():
    with pytest.raises(TypeError, match="inner"):
        optax_stab.stabilize(lambda g: g)
