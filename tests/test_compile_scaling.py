"""Compile cost grows linearly with the number of parameter leaves.

A scalar computed from every leaf and read by every leaf's update (a global
norm, an "all finite" flag) once made XLA duplicate an ``N``-long scalar chain
into each of the ``N`` leaf kernels: ``N**2`` instructions and minutes of
compile time at 1024 leaves (see ``optax_stab._tree``'s module note). These
tests fail if that comes back.

The structural test counts the instructions of the optimised HLO, which is
deterministic for a given XLA: with 4x the leaves a linear program has about
4x the instructions (4.1 to 4.3 measured for ``optax.clip_by_global_norm``'s
form, 8 to 32 leaves), the quadratic forms 9 to 12x. The timing
test is a ratio against ``optax.ema`` compiled in the same process, never an
absolute time.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax
import pytest

from optax_stab import _bench_cases
from tests import registry

SMALL, LARGE = 8, 32


def _tree(n: int, size: int = 8) -> dict[str, jax.Array]:
    return {f"l{i:04d}": jnp.full((size,), 0.01 * (i + 1)) for i in range(n)}


def _compiled(tx, n: int, size: int = 8):
    tx = optax.with_extra_args_support(tx)
    grads = _tree(n, size)
    state = tx.init(grads)

    def update(g, s):
        return tx.update(g, s, g, loss=jnp.float32(1.0))

    # XLA's default emitters, not the suite's (conftest.py), as a user compiles.
    lowered = jax.jit(update).lower(grads, state)
    return lowered.compile(_bench_cases.default_pipeline())


def _instructions(tx, n: int) -> int:
    text = _compiled(tx, n).as_text()
    return sum(1 for line in text.splitlines() if " = " in line)


@pytest.mark.parametrize("entry", registry.ENTRIES, ids=lambda e: e.name)
def test_optimised_hlo_grows_linearly_with_leaves(entry):
    small = _instructions(entry.make(), SMALL)
    large = _instructions(entry.make(), LARGE)
    ratio = large / small
    assert ratio <= 6.5, f"{LARGE}/{SMALL} leaves: {large}/{small} = {ratio:.1f}"


def _compile_seconds(make, n: int) -> float:
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        _compiled(make(), n, size=1024)
        best = min(best, time.perf_counter() - t0)
    return best


def test_ema_smoothing_compiles_within_a_few_times_optax_ema_at_512_leaves(
    no_compilation_cache,
):
    import optax_stab

    ours = _compile_seconds(lambda: optax_stab.ema_smoothing(0.9), 512)
    twin = _compile_seconds(lambda: optax.ema(0.9), 512)
    # Measured about 2.5x (optax.ema has no tree-wide finiteness test); the
    # quadratic form took over 100x here.
    assert ours <= 8 * twin, f"ema_smoothing {ours:.2f} s vs optax.ema {twin:.2f} s"


def _kernels(tx, n: int) -> int:
    """Kernels (fusions, copies, conditionals) of the optimised program."""
    return _bench_cases.hlo_counts(tx, n)["kernels"]


def test_tree_wide_decisions_add_no_kernels_per_leaf_over_their_optax_twins():
    # Compile time on XLA:CPU is mostly per compiled kernel. A reduction over a
    # 1K leaf is three kernels there; reducing the small leaves together
    # (_tree.reduction_groups) leaves the per-leaf update kernels of the twin
    # plus a constant. Counted at 64 leaves: 3 more kernels per leaf would be
    # +192, a constant is a few. spike_clip's count of clipped coordinates
    # reads g and nu: summed leaf by leaf and stacked, it was 3 kernels per
    # leaf (XLA split the sum), summed over the stacked leaves it is one.
    import optax_stab

    pairs = (
        (optax_stab.ema_smoothing(0.9), optax.ema(0.9)),
        (optax_stab.spike_clip(), optax.ema(0.9)),
        (optax_stab.clip_by_norm(1.0), optax.clip_by_global_norm(1.0)),
        (optax_stab.guard_nonfinite(optax.adam(1e-3)), optax.adam(1e-3)),
    )
    for ours, twin in pairs:
        assert _kernels(ours, 64) <= _kernels(twin, 64) + 16


def _donated_step(tx, options):
    def step(g, carry):
        p, s = carry
        u, s = tx.update(g, s, p, loss=jnp.float32(1.0))
        return optax.apply_updates(p, u), s

    return jax.jit(step, donate_argnums=1, compiler_options=options)


def _state_copies(tx, options) -> int:
    """Full-size ``copy`` ops in a donated ``update`` + ``apply_updates`` step."""
    params = [jnp.zeros((8192,)) for _ in range(2)]
    f = _donated_step(tx, options)
    text = f.lower(params, (params, tx.init(params))).compile().as_text()
    entry = text[text.index("ENTRY") :]
    assert "= f32[8192]{0} parameter(" in entry  # the pattern below can match
    return entry.count("f32[8192]{0} copy(")


def test_region_analysis_compiles_guards_without_copies_of_the_donated_state():
    # The guards read the old inner state to keep it on a skipped step, and
    # spike_clip's output reads the old nu, while the new state is written in
    # place over the donated buffers. XLA:CPU's default copy insertion then
    # copies that state every step (docs/benchmarks.md, "Copies"); with the
    # option that docs/guide.md recommends, it finds an order that needs none.
    import optax_stab
    from optax_stab._bench_cases import region_analysis

    adam = optax.adam(1e-3)
    for tx in (
        optax_stab.guard_nonfinite(adam),
        optax_stab.spike_guard(adam),
        optax_stab.stabilize(adam),
        optax.chain(optax_stab.spike_clip(), adam),
    ):
        assert _state_copies(tx, region_analysis()) == 0

    # Only buffers move: a run with a skipped (NaN) step is bit for bit the
    # run compiled without the option.
    tx = optax_stab.guard_nonfinite(adam)
    params = [jnp.linspace(-1.0, 1.0, 8192), jnp.ones((8192,))]
    ramp, ones = params
    grads = [  # one gradient tree per step; the second holds a NaN leaf
        [ramp * 0.5 + 0.1, ones * 0.2],
        [jnp.full((8192,), jnp.nan), ones],
        [ramp - 0.3, ones * -0.7],
    ]
    runs = []
    for options in (None, region_analysis()):
        f = _donated_step(tx, options)
        carry = jax.tree.map(jnp.copy, (params, tx.init(params)))
        for g in grads:
            carry = f(g, carry)
        runs.append(carry)
    assert int(runs[0][1].nonfinite_steps) == 1
    for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])):
        assert jnp.array_equal(a, b)


def _full_size_arrays(tx) -> int:
    """Full-size arrays in the compiled step: inputs, outputs, temporaries."""
    params = [jnp.zeros((8192,)) for _ in range(2)]
    text = _donated_step(tx, None).lower(params, (params, tx.init(params)))
    text = text.compile().as_text()
    return text[text.index("ENTRY") :].count("= f32[8192]{0} ")


def test_norms_of_raw_gradients_keep_their_squares_apart_from_adams():
    # XLA would merge a norm's g * g with Adam's g**2 and write the merged
    # square out as a full-size temporary, fresh memory on every CPU step
    # (2x Adam's step for spike_guard(adam) at 8M; _tree's module note,
    # "Squares of their own"). Without the merge, the health monitor adds no
    # full-size array to Adam's step, and spike_guard none to guard_nonfinite's
    # (whose copies of the donated state both share without the option).
    import optax_stab

    adam = optax.adam(1e-3)
    plain = _full_size_arrays(adam)
    assert plain >= 14  # g, p, mu, nu in and p, mu, nu out, two leaves each
    assert _full_size_arrays(optax.chain(optax_stab.health_monitor(), adam)) == plain
    guarded = _full_size_arrays(optax_stab.guard_nonfinite(adam))
    assert _full_size_arrays(optax_stab.spike_guard(adam)) == guarded


def test_the_norms_barrier_is_lowered_for_cpu_only():
    # On GPU the barrier would cost a write and a read of a computed input
    # (_tree's module note); jax.export lowers for a platform without one.
    from jax import export

    from optax_stab import _tree

    f = jax.jit(lambda g: _tree.global_norm(g))
    arg = [jax.ShapeDtypeStruct((64,), jnp.float32)]
    barriers = {
        p: export.export(f, platforms=[p])(arg)
        .mlir_module()
        .count("optimization_barrier")
        for p in ("cpu", "cuda", "rocm")
    }
    assert barriers["cpu"] >= 1
    assert barriers["cuda"] == barriers["rocm"] == 0


def test_tree_wide_decisions_are_computed_once_not_in_every_leaf_kernel():
    # A guard's skip flag and a clipper's "clip" flag come from a chain of
    # scalar ops (history statistics, z-scores, the run bound). Read by every
    # leaf's select, the chain was copied into each leaf's kernel: 139 more
    # instructions per leaf for spike_guard(adam) than for guard_nonfinite(adam)
    # (13.3 s against 7.0 s to compile on 1024 leaves), 15 more for
    # zscore_clip than for optax.clip_by_global_norm. Through _tree.decided
    # the leaves read it as a parameter: what they add over their twin stays
    # the same whatever the number of leaves.
    import optax_stab

    adam = optax.adam(1e-3)
    pairs = (
        (optax_stab.spike_guard(adam), optax_stab.guard_nonfinite(adam)),
        (optax_stab.zscore_clip(), optax.clip_by_global_norm(1.0)),
    )
    for ours, twin in pairs:
        extra = [_instructions(ours, n) - _instructions(twin, n) for n in (8, 32)]
        assert extra[1] - extra[0] <= 4 * (32 - 8), extra


def test_health_monitor_sums_its_small_leaves_stacked():
    # Summed leaf by leaf, a 1K leaf's norm is three kernels on XLA:CPU (the
    # elementwise part, a partial and a final reduction): 5.25 kernels per
    # leaf in all, against optax.clip_by_global_norm's 4. Stacked, the sums
    # are one kernel per stack; a leaf keeps the slice that hands it its norm
    # and the copy of its update (1.9 measured).
    import optax_stab

    ours = _bench_cases.per_leaf_counts(optax_stab.health_monitor())
    twin = _bench_cases.per_leaf_counts(optax.clip_by_global_norm(1.0))
    assert ours["kernels"] <= twin["kernels"] - 1, (ours, twin)
