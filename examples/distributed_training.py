"""Data-parallel + FSDP training with optax_stab, on one or many processes.

A 24-layer residual MLP (48 parameter leaves, width 32) is trained on
generated regression data with

    spike_guard(chain(health_monitor(), zscore_clip(max_norm=1.0), adamw(...)))

on a 2-D device mesh ``("data", "fsdp")``: the batch is split over ``data``,
every parameter leaf (and every per-parameter optimizer buffer) is split
along its first axis over ``fsdp``. Two modes compute the same step:

* ``--mode gspmd``: ``jax.jit`` with ``NamedSharding``. The transforms see
  global arrays, so they take no ``axis_name``. The optimizer state gets the
  sharding of its param (scalars and histories are replicated).
* ``--mode shard_map``: the step under ``jax.shard_map``. Each device gathers
  the params over ``fsdp``, takes the gradient of its data shard, averages it
  over ``data`` (``lax.pmean``: a replicated data-parallel gradient) and keeps
  its own ``fsdp`` slice. The optax_stab transforms get ``axis_name="fsdp"``
  (the slices of one gradient); ``loss=`` is the global loss.

Faults for the tests: ``--nan-step K`` puts a NaN, ``--spike-step K`` adds a
large spike (+10 per element), into rows 8-15 of every gradient leaf at step
``K``: under ``shard_map`` ONE device adds it (data index 0, the fsdp slice
holding those rows) before the data-parallel mean; under GSPMD it is added to
the global gradient's rows, the same values. Every device must skip that step,
and every process must print the same counters.

Single process on 8 simulated CPU devices, or two local processes with 4 each
(``jax.distributed`` with the gloo CPU collectives; the same code runs with
one process per host on GPU/TPU):

    python examples/distributed_training.py --devices 8 --mode shard_map
    python examples/distributed_training.py --processes 2 --devices 4 \\
        --nan-step 5 --spike-step 14 --checkpoint /tmp/dist_ckpt
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from typing import Any

LAYERS, WIDTH, BATCH, STEPS = 24, 32, 64, 24
FAULT_ROWS = (8, 16)  # rows of every leaf that the injected fault hits
SPIKE = 10.0  # added to every element of those rows: a ~100x norm spike


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("gspmd", "shard_map"), default="gspmd")
    parser.add_argument("--devices", type=int, default=8, help="CPU devices/process")
    parser.add_argument(
        "--backend",
        default="cpu",
        help="'cpu' (simulated devices, gloo) or 'gpu'/'tpu'",
    )
    parser.add_argument("--processes", type=int, default=1, choices=(1, 2))
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--data", type=int, default=None, help="data axis size")
    parser.add_argument("--nan-step", type=int, default=None)
    parser.add_argument("--spike-step", type=int, default=None)
    parser.add_argument("--checkpoint", default=None, help="orbax directory")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------
# Everything below imports jax lazily, so that ``main`` can set XLA_FLAGS
# (the number of CPU devices) before JAX starts.


def make_tx(axis_name: str | None = None, learning_rate: float = 3e-3):
    """The chain under test; ``axis_name`` for the sliced (FSDP) gradients."""
    import optax

    import optax_stab

    inner = optax.chain(
        optax_stab.health_monitor(axis_name=axis_name),
        optax_stab.zscore_clip(max_norm=1.0, axis_name=axis_name),
        optax.adamw(learning_rate, weight_decay=1e-4),
    )
    return optax_stab.spike_guard(inner, window=16, warmup_steps=8, axis_name=axis_name)


def init_params(seed: int = 0) -> dict[str, dict[str, Any]]:
    """NumPy params: ``{"l00": {"b", "w"}, ...}``, every leaf WIDTH rows."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {
        f"l{i:02d}": {
            "b": np.zeros(WIDTH, np.float32),
            "w": (rng.normal(size=(WIDTH, WIDTH)) / WIDTH).astype(np.float32),
        }
        for i in range(LAYERS)
    }


def make_data(steps: int, seed: int = 1) -> tuple[Any, Any]:
    """NumPy batches ``x, y`` of shape (steps, BATCH, WIDTH): y = tanh(x A)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(WIDTH, WIDTH)) / np.sqrt(WIDTH)
    x = rng.normal(size=(steps, BATCH, WIDTH))
    return x.astype(np.float32), np.tanh(x @ teacher).astype(np.float32)


def loss_fn(params, x, y):
    """Mean squared error of the residual MLP ``h <- h + tanh(h w + b)``."""
    import jax.numpy as jnp

    h = x
    for name in sorted(params):
        h = h + jnp.tanh(h @ params[name]["w"] + params[name]["b"])
    return jnp.mean((h - y) ** 2)


def fault(step, nan_step: int | None, spike_step: int | None):
    """The value added to the faulty rows at ``step`` (0, NaN or SPIKE)."""
    import jax.numpy as jnp

    delta = jnp.zeros([], jnp.float32)
    if nan_step is not None:
        delta = jnp.where(step == nan_step, jnp.nan, delta)
    if spike_step is not None:
        delta = jnp.where(step == spike_step, SPIKE, delta)
    return delta


def _add_rows(grads, rows_mask, delta):
    """Adds ``delta`` to the rows of every leaf where ``rows_mask`` holds."""
    import jax
    import jax.numpy as jnp

    def add(g):
        shape = (-1,) + (1,) * (g.ndim - 1)
        return g + jnp.where(rows_mask, delta, 0.0).reshape(shape)

    return jax.tree.map(add, grads)


def make_mesh(data: int | None = None, devices=None):
    """A ``("data", "fsdp")`` mesh; ``data`` defaults to 2 when it divides."""
    import jax
    import numpy as np

    devices = jax.devices() if devices is None else devices
    n = len(devices)
    data = (2 if n % 2 == 0 and n > 1 else 1) if data is None else data
    grid = np.asarray(devices).reshape(data, n // data)
    return jax.sharding.Mesh(grid, ("data", "fsdp"))


def param_specs(params):
    """Every leaf split along its first axis over ``fsdp``."""
    import jax
    from jax.sharding import PartitionSpec as P

    return jax.tree.map(lambda p: P("fsdp", *(None,) * (p.ndim - 1)), params)


def state_specs(tx, params):
    """Optimizer-state specs derived from the params.

    A state leaf whose pytree path ends with a param's path and whose shape is
    that param's (adamw's ``mu`` and ``nu``) gets the param's spec; every
    other leaf (counters, norm histories, the health monitor's per-leaf norm
    scalars, which share the params' paths but not their shapes) is
    replicated.
    """
    import jax
    from jax.sharding import PartitionSpec as P

    by_path = {
        tuple(path): (p.shape, spec)
        for (path, p), spec in zip(
            jax.tree.leaves_with_path(params), jax.tree.leaves(param_specs(params))
        )
    }
    depth = {len(k) for k in by_path}

    def spec(path, leaf):
        for n in depth:
            shape, pspec = by_path.get(tuple(path[-n:]), (None, None))
            if shape == leaf.shape:
                return pspec
        return P()

    return jax.tree.map_with_path(spec, jax.eval_shape(tx.init, params))


def _put(mesh, tree, specs):
    """Global arrays from host NumPy trees (each process fills its shards)."""
    import jax
    from jax.sharding import NamedSharding

    def put(x, spec):
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

    return jax.tree.map(put, tree, specs)


def build(mode: str, mesh, nan_step=None, spike_step=None, tx=None):
    """``(init, step)``: ``init(params) -> state``, ``step(params, state, x, y,
    t) -> (params, state, loss)``, jitted for ``mesh``. ``tx`` overrides the
    chain (the all-gather test compiles plain adamw with it; gspmd only)."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    params0 = init_params()
    if tx is None:
        tx = make_tx("fsdp" if mode == "shard_map" else None)
    pspecs, sspecs = param_specs(params0), state_specs(tx, params0)
    named = lambda specs: jax.tree.map(  # noqa: E731
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )
    psh, ssh, rep = named(pspecs), named(sspecs), NamedSharding(mesh, P())
    init = jax.jit(tx.init, out_shardings=ssh)
    lo, hi = FAULT_ROWS
    rows = jnp.arange(WIDTH)
    faulty = (rows >= lo) & (rows < hi)

    if mode == "gspmd":

        def step(params, state, x, y, t):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            grads = _add_rows(grads, faulty, fault(t, nan_step, spike_step))
            updates, state = tx.update(grads, state, params, loss=loss)
            return optax.apply_updates(params, updates), state, loss

        return init, jax.jit(step, out_shardings=(psh, ssh, rep))

    n_data, n_fsdp = mesh.shape["data"], mesh.shape["fsdp"]
    local_rows = WIDTH // n_fsdp

    def local_step(params, state, x, y, t):
        full = jax.tree.map(
            lambda p: jax.lax.all_gather(p, "fsdp", axis=0, tiled=True), params
        )
        # Each device's own gradient of its data shard: marked varying over
        # "data" (else shard_map's AD would psum it over "data" implicitly).
        full = jax.lax.pcast(full, "data", to="varying")
        loss, grads = jax.value_and_grad(loss_fn)(full, x, y)
        # ONE device (data index 0) injects the fault, into its own fsdp
        # slice, before the data-parallel mean (scaled so the mean adds it).
        d, f = jax.lax.axis_index("data"), jax.lax.axis_index("fsdp")
        mine = faulty & (rows // local_rows == f) & (d == 0)
        grads = _add_rows(grads, mine, n_data * fault(t, nan_step, spike_step))
        grads = jax.lax.pmean(grads, "data")
        # The loss is already equal on every fsdp device (all of them see the
        # full params); the mean over fsdp too marks it replicated for
        # shard_map's check (check_vma) and changes it only by rounding.
        loss = jax.lax.pmean(loss, ("data", "fsdp"))
        grads = jax.tree.map(
            lambda g: jax.lax.dynamic_slice_in_dim(g, f * local_rows, local_rows),
            grads,
        )
        updates, state = tx.update(grads, state, params, loss=loss)
        return optax.apply_updates(params, updates), state, loss

    batch = P("data", None)
    mapped = jax.shard_map(
        local_step,
        mesh=mesh,
        in_specs=(pspecs, sspecs, batch, batch, P()),
        out_specs=(pspecs, sspecs, P()),
        check_vma=True,
    )
    return init, jax.jit(mapped, out_shardings=(psh, ssh, rep))


def _fetch(tree):
    """Host NumPy copy of a tree of global arrays (gathered across processes)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def train(
    mode: str,
    steps: int = STEPS,
    *,
    mesh=None,
    nan_step: int | None = None,
    spike_step: int | None = None,
    checkpoint: str | None = None,
    hlo: bool = False,
) -> dict[str, Any]:
    """Trains for ``steps`` steps on ``mesh`` (default: every device).

    Returns host values (``losses`` per step, final ``params``, the health
    ``report`` and the guard/clip ``counters``), the final sharded
    ``sharded_params`` and ``sharded_state``, and with ``hlo`` the compiled
    step's HLO text as ``hlo``.
    """
    import jax.numpy as jnp

    import optax_stab

    mesh = make_mesh() if mesh is None else mesh
    init, step = build(mode, mesh, nan_step, spike_step)
    params0 = init_params()
    from jax.sharding import PartitionSpec as P

    params = _put(mesh, params0, param_specs(params0))
    state = init(params)
    xs, ys = make_data(steps)
    batch = P("data", None)
    losses = []
    for t in range(steps):
        x, y = _put(mesh, (xs[t], ys[t]), (batch, batch))
        args = (params, state, x, y, jnp.int32(t))
        params, state, loss = step(*args)
        losses.append(loss)
    text = step.lower(*args).compile().as_text() if hlo and steps else None
    if checkpoint is not None:
        _checkpoint_roundtrip(checkpoint, params, state)
    host_params, host_state, host_losses = _fetch((params, state, losses))
    report = optax_stab.health_report(host_state)
    keys = ("spike_steps", "nonfinite_steps", "accepted_steps", "clipped_steps")
    return {
        "losses": [float(v) for v in host_losses],
        "params": jax_tree_to_numpy(host_params),
        "report": report,
        "counters": {k: int(report[k]) for k in keys if k in report},
        "mesh": dict(mesh.shape),
        "sharded_params": params,
        "sharded_state": state,
        "hlo": text,
    }


def jax_tree_to_numpy(tree):
    import jax
    import numpy as np

    return jax.tree.map(np.asarray, tree)


def _checkpoint_roundtrip(directory: str, params, state) -> None:
    """Saves params + state with orbax, restores them into the same shardings
    (a fresh abstract tree, as a new process would), and checks equality."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    tree = {"params": params, "opt_state": state}
    path = os.path.join(os.path.abspath(directory), "state")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree, force=True)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
    )
    restored = checkpointer.restore(path, abstract)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(restored)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b)
    same = jax.tree.map(
        lambda a, b: bool(np.array_equal(a, b, equal_nan=True)),
        *_fetch((tree, restored)),
    )
    assert all(jax.tree.leaves(same)), "restored checkpoint differs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv: list[str], args: argparse.Namespace) -> int:
    """Re-runs this script as ``args.processes`` local processes."""
    port = _free_port()
    procs = []
    for i in range(args.processes):
        cmd = [sys.executable, os.path.abspath(__file__), *argv]
        cmd += ["--process-id", str(i), "--port", str(port)]
        procs.append(subprocess.Popen(cmd))
    codes = [p.wait() for p in procs]
    if args.json is not None and not any(codes):
        results = []
        for i in range(args.processes):
            with open(f"{args.json}.{i}") as f:
                results.append(json.load(f))
            os.remove(f"{args.json}.{i}")
        with open(args.json, "w") as f:
            json.dump(results, f)
    return max(codes)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.processes > 1 and args.process_id is None:
        return _launch(argv, args)
    if args.backend == "cpu":
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.devices}"
        )
    import jax

    jax.config.update("jax_platforms", args.backend)
    if args.process_id is not None:
        if args.backend == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.processes,
            process_id=args.process_id,
        )
    out = train(
        args.mode,
        args.steps,
        mesh=make_mesh(args.data),
        nan_step=args.nan_step,
        spike_step=args.spike_step,
        checkpoint=args.checkpoint,
    )
    who = f"process {jax.process_index()}/{jax.process_count()}"
    print(f"[{who}] mesh {out['mesh']}, mode {args.mode}")
    print(f"[{who}] final loss {out['losses'][-1]:.6f}")
    print(f"[{who}] counters {out['counters']}")
    report = {k: v for k, v in out["report"].items() if "/" not in k}
    print(f"[{who}] health report (per-leaf keys left out) {report}")
    if args.checkpoint is not None:
        print(f"[{who}] checkpoint saved and restored: equal")
    if args.json is not None:
        name = (
            args.json if args.process_id is None else f"{args.json}.{args.process_id}"
        )
        result = {
            "process": jax.process_index(),
            "losses": out["losses"],
            "counters": out["counters"],
            "report": out["report"],
            "params": jax.tree.map(lambda a: a.tolist(), out["params"]),
        }
        with open(name, "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
