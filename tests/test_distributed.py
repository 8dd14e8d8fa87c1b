"""examples/distributed_training.py: one device, 8 devices, 2 processes agree.

The example trains a 24-layer MLP (48 leaves) with
``spike_guard(chain(health_monitor(), zscore_clip(max_norm=1), adamw))`` on a
``("data", "fsdp")`` mesh, under GSPMD (no ``axis_name``) or ``shard_map``
(``axis_name="fsdp"``). At ``NAN_AT`` one device's gradient slice holds a NaN,
at ``SPIKE_AT`` one device's slice carries a ~100x norm spike. The guard must
skip both steps on every device, so every run follows the 1-device run's
loss curve and ends at its params, to float32 summation-order tolerance.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from tests import _examples

dt = _examples.load_example("distributed_training")

STEPS = 24
NAN_AT, SPIKE_AT = 5, 14
# Both faults are skipped, nothing else is: the spike adds 10 to a quarter of
# every leaf's rows (norm ~800 against ~1), far above z = 6 of the history.
EXPECTED_COUNTERS = {"spike_steps": 2, "nonfinite_steps": 1}
# Each run sums norms and the data-parallel mean in its own order: float32
# rounding (~1e-7 relative) per step, carried by adamw's normalised steps
# (lr 3e-3) over 24 steps stays far below 1e-5.
ATOL = 1e-5


@functools.cache
def _run(name: str):
    devices = jax.devices()[:1] if name == "one_device" else None
    mode = "shard_map" if name == "shard_map" else "gspmd"
    return dt.train(
        mode,
        STEPS,
        mesh=dt.make_mesh(devices=devices),
        nan_step=NAN_AT,
        spike_step=SPIKE_AT,
        hlo=name == "gspmd",
    )


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The 2-process x 4-device run, started first so it overlaps the others."""
    out = tmp_path_factory.mktemp("dist") / "results.json"
    cmd = [
        sys.executable,
        str(_examples.EXAMPLES / "distributed_training.py"),
        "--processes", "2", "--devices", "4", "--mode", "shard_map",
        "--steps", str(STEPS), "--nan-step", str(NAN_AT),
        "--spike-step", str(SPIKE_AT), "--json", str(out),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    # The suite's compile flags (tests/conftest.py), without its device count:
    # the example sets its own.
    env["XLA_FLAGS"] = " ".join(
        flag
        for flag in os.environ.get("XLA_FLAGS", "").split()
        if "device_count" not in flag
    )
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _max_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _assert_matches_one_device(result):
    ref = _run("one_device")
    assert ref["mesh"] == {"data": 1, "fsdp": 1}
    assert {k: ref["counters"][k] for k in EXPECTED_COUNTERS} == EXPECTED_COUNTERS
    assert ref["counters"]["accepted_steps"] == STEPS - 2
    assert np.all(np.isfinite(ref["losses"]))
    assert ref["losses"][-1] < 0.2 * ref["losses"][0]  # it trains
    np.testing.assert_allclose(result["losses"], ref["losses"], rtol=1e-5, atol=ATOL)
    assert _max_diff(result["params"], ref["params"]) < ATOL
    assert result["counters"] == ref["counters"]


@pytest.mark.parametrize("mode", ["gspmd", "shard_map"])
def test_eight_devices_match_one_device(mode, two_processes):
    result = _run(mode)
    assert result["mesh"] == {"data": 2, "fsdp": 4}
    _assert_matches_one_device(result)


def test_two_processes_match_one_device_and_each_other(two_processes):
    proc, out = two_processes
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    with open(out) as f:
        results = json.load(f)
    assert [r["process"] for r in results] == [0, 1]
    for r in results:
        params = jax.tree.map(
            np.asarray, r["params"], is_leaf=lambda x: isinstance(x, list)
        )
        _assert_matches_one_device({**r, "params": params})
    # Every process reports the same numbers, bit for bit.
    first, second = results
    assert first["losses"] == second["losses"]
    assert first["report"] == second["report"]
    assert first["params"] == second["params"]


def test_state_leaves_have_their_params_sharding():
    result = _run("gspmd")
    params, state = result["sharded_params"], result["sharded_state"]
    by_path = {tuple(k): p for k, p in jax.tree.leaves_with_path(params)}
    split = 0
    for path, leaf in jax.tree.leaves_with_path(state):
        param = by_path.get(tuple(path[-2:]))
        if param is not None and leaf.shape == param.shape:
            assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim), path
            assert not leaf.sharding.is_fully_replicated, path
            split += 1
        else:  # counters, histories, per-leaf norm scalars
            assert leaf.sharding.is_fully_replicated, (path, leaf.sharding)
    assert split == 2 * len(by_path)  # adamw's mu and nu, nothing else


_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1}


def _all_gathers(hlo: str) -> tuple[int, int]:
    """Number of all-gather ops in compiled HLO text and bytes of their results."""
    count = total = 0
    for line in hlo.splitlines():
        found = re.search(r"=\s*(.*?)\s+all-gather(?:-start)?\(", line)
        if not found:
            continue
        count += 1
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", found.group(1)):
            size = math.prod(int(d) for d in dims.split(",") if d)
            total += _BYTES[dtype] * size
    return count, total


def test_step_gathers_no_more_than_plain_adamw():
    result = _run("gspmd")
    mesh = dt.make_mesh()
    plain = optax.adamw(3e-3, weight_decay=1e-4)
    init, step = dt.build("gspmd", mesh, NAN_AT, SPIKE_AT, tx=plain)
    params = result["sharded_params"]
    x, y = dt._put(
        mesh,
        tuple(a[0] for a in dt.make_data(1)),
        (jax.sharding.PartitionSpec("data", None),) * 2,
    )
    args = (params, init(params), x, y, np.int32(0))
    plain_count, plain_bytes = _all_gathers(step.lower(*args).compile().as_text())
    count, nbytes = _all_gathers(result["hlo"])
    # FSDP gathers the 24 weight matrices for the forward and backward passes.
    assert plain_count >= dt.LAYERS and plain_bytes >= dt.LAYERS * 4 * dt.WIDTH**2
    # With the state replicated instead, the step gathers 143 times, 395 KB.
    assert count <= plain_count and nbytes <= plain_bytes
