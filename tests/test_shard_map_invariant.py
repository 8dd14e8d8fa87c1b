"""Registry-driven: every transform taking ``axis_name`` is shard_map-exact.

For every entry of ``registry.ENTRIES`` whose factory accepts ``axis_name``,
a run under ``jax.shard_map`` over the 8 CPU devices, with the gradients and
params split along their first axis and one loss per device, gives on every
device the single-device result on the full arrays with the mean loss: the
same updates (each device its shard) and the same state (each device its
shard of a per-parameter buffer, every device the whole of a scalar or
history). The stream holds a norm spike that only one device's shard carries,
a NaN in one device's shard only, and a loss spike on one device only.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_stab
from tests import _shard, registry

N = _shard.N
STEPS = 7
SPIKE_AT, NAN_AT, LOSS_SPIKE_AT = 3, 4, 5

ENTRIES = [
    e
    for e in registry.ENTRIES
    if "axis_name" in inspect.signature(e.factory).parameters
]
IDS = [e.name for e in ENTRIES]


def test_every_tree_wide_transform_is_selected():
    # The contract (DESIGN.md): every transform whose decision or statistic
    # spans the tree takes axis_name, so the filter above must find them.
    assert {e.factory for e in ENTRIES} >= {
        optax_stab.clip_by_norm,
        optax_stab.autoclip,
        optax_stab.zscore_clip,
        optax_stab.adaptive_tensor_clip,
        optax_stab.guard_nonfinite,
        optax_stab.spike_guard,
        optax_stab.health_monitor,
    }


@functools.cache
def _data():
    """Params, ``STEPS`` gradients (first axis split over devices), losses."""
    kw, kb, kl = jax.random.split(jax.random.key(0), 3)
    scale = (1.0 + jnp.arange(STEPS, dtype=jnp.float32) % 3)[:, None]
    w = jax.random.normal(kw, (STEPS, N, 4)) * scale[:, :, None]
    b = jax.random.normal(kb, (STEPS, N)) * scale
    # Only device 5's rows spike (the global norm grows about 30-fold) ...
    w, b = w.at[SPIKE_AT, 5].mul(100.0), b.at[SPIKE_AT, 5].mul(100.0)
    # ... and only device 2's shard holds a NaN.
    w = w.at[NAN_AT, 2, 1].set(jnp.nan)
    losses = 1.0 + 0.05 * jax.random.normal(kl, (STEPS, N))
    losses = losses.at[LOSS_SPIKE_AT, 6].set(40.0)  # mean loss about 6
    params = {
        "b": jnp.linspace(0.5, -0.5, N, dtype=jnp.float32),
        "w": jnp.linspace(-1.0, 1.0, 4 * N, dtype=jnp.float32).reshape(N, 4),
    }
    return params, {"b": b, "w": w}, losses


@functools.cache
def _runs(name):
    """Single-device ``(updates, states)`` and per-device ``(updates, states)``."""
    entry = next(e for e in ENTRIES if e.name == name)
    data = _data()
    expected = _shard.single(entry.make(), *data)
    return expected, _shard.sharded(entry.make(axis_name=_shard.AXIS), *data)


def _close(a, b):
    # NaN where the reference has NaN (a clipper passes a NaN step unchanged).
    np.testing.assert_allclose(
        np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=2e-5, atol=1e-6
    )


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_updates_match_single_device(entry):
    (expected, _), (got, _) = _runs(entry.name)
    jax.tree.map(_close, got, expected)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_every_device_state_matches_single_device(entry):
    (_, expected), (_, per_device) = _runs(entry.name)
    _shard.assert_every_device_matches(expected, per_device)
