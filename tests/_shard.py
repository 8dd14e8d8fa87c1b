"""Runs a transform over a gradient stream, on one device or under shard_map.

The ``axis_name`` tests (guards, health, the registry-driven shard_map
invariant) share these runners: every leaf of the params and gradients is
split along its (parameter) first axis over the ``N`` CPU devices, and the
loss has one value per device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "x"
N = 8


@functools.cache
def mesh() -> jax.sharding.Mesh:
    assert jax.device_count() == N, "tests/conftest.py sets 8 CPU devices"
    return jax.make_mesh((N,), (AXIS,))


def _split(treedef, lead: int):
    """Specs splitting every leaf's axis ``lead`` over the devices."""
    spec = P(*(None,) * lead, AXIS)
    return jax.tree.unflatten(treedef, [spec] * treedef.num_leaves)


def _scan(tx, params, grads, losses, per_step_state):
    def step(state, xs):
        g, loss = xs
        kw = {} if loss is None else {"loss": loss}
        u, state = tx.update(g, state, params, **kw)
        return state, (u, per_step_state(state))

    _, out = jax.lax.scan(step, tx.init(params), (grads, losses))
    return out


@functools.cache
def _single(tx):
    return jax.jit(functools.partial(_scan, tx, per_step_state=lambda s: s))


def single(tx, params, grads, losses=None):
    """Single-device run: ``(updates, states)``, each stacked over the steps.

    ``losses`` (steps, N) are averaged over the devices' axis. NumPy arrays.
    """
    mean = None if losses is None else jnp.mean(losses, axis=1)
    return jax.device_get(_single(tx)(params, grads, mean))


@functools.cache
def _sharded(tx, treedef, with_loss):
    def local(p, g, loss):
        loss = None if loss is None else loss[:, 0]
        # Each device's whole state, on a new axis after the steps' axis.
        return _scan(tx, p, g, loss, lambda s: jax.tree.map(lambda x: x[None], s))

    loss_spec = P(None, AXIS) if with_loss else P()
    return jax.jit(
        jax.shard_map(
            local,
            mesh=mesh(),
            in_specs=(_split(treedef, 0), _split(treedef, 1), loss_spec),
            out_specs=(_split(treedef, 1), P(None, AXIS)),
        )
    )


def sharded(tx, params, grads, losses=None):
    """``tx`` under ``jax.shard_map`` over ``N`` devices, axis name ``AXIS``.

    ``params`` leaves are split along axis 0, ``grads`` (stacked over the
    steps) along axis 1, ``losses`` (steps, N) give device ``d`` the loss
    ``losses[:, d]``. Returns ``(updates, states)`` as NumPy arrays: the
    updates stacked over the steps (each device wrote its shard), and every
    device's state after every step, of shape ``(steps, N) + local shape``.
    """
    treedef = jax.tree.structure(params)
    put = lambda x, s: jax.device_put(x, NamedSharding(mesh(), s))  # noqa: E731
    run = _sharded(tx, treedef, losses is not None)
    out = run(
        jax.tree.map(put, params, _split(treedef, 0)),
        jax.tree.map(put, grads, _split(treedef, 1)),
        None if losses is None else put(losses, P(None, AXIS)),
    )
    return jax.device_get(out)


def assert_every_device_matches(expected, per_device, rtol=2e-5, atol=1e-5):
    """Every device's state equals the single-device state, at every step.

    The tolerance covers the summation order: a norm summed over devices
    differs from the one-device sum by a few float32 ulps (~1e-7 relative),
    and a z-score ``(x - mu) / sigma`` near 0 amplifies that by ``x / sigma``
    (~10 here), hence ``atol`` 1e-5.

    ``expected`` from :func:`single`, ``per_device`` from :func:`sharded`. A
    leaf of the same local shape as the full one (a scalar, a history) must
    be whole on every device; a per-parameter buffer must be that device's
    shard along the one axis where the shapes differ. NaN matches NaN.
    """
    assert jax.tree.structure(expected) == jax.tree.structure(per_device)
    for ref, got in zip(jax.tree.leaves(expected), jax.tree.leaves(per_device)):
        assert got.dtype == ref.dtype, (got.dtype, ref.dtype)
        shape, full = got.shape[2:], ref.shape[1:]
        split = [i for i, (a, b) in enumerate(zip(shape, full)) if a != b]
        assert len(split) <= 1 and len(shape) == len(full), (shape, full)
        for t in range(ref.shape[0]):
            rows = [got[t, d] for d in range(N)]
            if split:
                rows = [np.concatenate(rows, axis=split[0])]
            for row in rows:
                np.testing.assert_allclose(
                    np.asarray(row, np.float64),
                    np.asarray(ref[t], np.float64),
                    rtol=rtol,
                    atol=atol,
                )
