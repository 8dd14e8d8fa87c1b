"""Speed of optax_stab transforms vs their optax twins and the streaming roofline.

Run ``optax-stab bench`` (or ``python -m optax_stab bench``).

Every case is one jitted step with its state donated and fed back, as in a
training loop; all are compiled and run once (untimed), then timed for R
rounds, each round running every case once in a fresh random order, so that
load from other processes hits candidates and twins alike. Reported per case:

- ms/step: median over rounds, with the interquartile range [q1, q3];
- x roofline: time / (ideal bytes / streaming bandwidth), where the bandwidth
  comes from a donated in-place ``x = 0.5*x + 0.5`` over the same bytes (one
  flat array), run 3 times at random places in the same round (the fastest
  counts); median over rounds. It is >= 1 once the stream is bandwidth-bound
  (sizes well above the caches);
- x twin: time / time of its twin (the closest optax transform; jnp.median
  for the median network) in the same round; median of these paired ratios,
  with their IQR.

A targets table prints PASS/MISS next to each measured ratio. ``--compile``
instead prints the lower+compile time of each transform's jitted update on 16,
256 and 1024 leaves of 1024 float32, next to its optax twin, and what each
leaf adds to the compiled program (HLO ops, kernels, distinct kernels).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
from collections.abc import Sequence

import jax
import numpy as np

from optax_stab import _bench_cases as cases_lib

_COMPILE_LEAVES = (16, 256, 1024)
_STREAM_RUNS = 3


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return n


def _leaf_counts(value: str) -> tuple[int, ...]:
    try:
        counts = [_positive_int(v) for v in value.split(",")]
    except argparse.ArgumentTypeError:
        counts = []
    if not counts:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated positive integers, got {value!r}"
        )
    return tuple(sorted(set(counts)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags, shared with ``optax-stab bench``."""
    add = parser.add_argument
    add(
        "--size",
        type=_positive_int,
        default=8 * 2**20,
        help="float32 elements in all leaves together (default 8M)",
    )
    add(
        "--leaves",
        type=_positive_int,
        default=16,
        help="split the elements into this many (near-)equal leaves (default 16)",
    )
    add(
        "--repeats",
        type=_positive_int,
        default=15,
        help="timed rounds; each runs every case once in a shuffled order (default 15)",
    )
    add(
        "--seed",
        type=int,
        default=0,
        help="seed of the round order and the gradients (default 0)",
    )
    add(
        "--compile",
        action="store_true",
        help="print the compile-time table instead of timing steps",
    )
    add(
        "--compile-leaves",
        type=_leaf_counts,
        default=_COMPILE_LEAVES,
        metavar="N,N,...",
        help="leaf counts of the compile table (default 16,256,1024)",
    )
    add("--json", metavar="PATH", help="also write the result rows as JSON")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Checks across flags; a failure exits through ``parser.error`` (code 2)."""
    if args.leaves > args.size:
        parser.error(f"--leaves ({args.leaves}) must be at most --size ({args.size})")
    folder = os.path.dirname(os.path.abspath(args.json)) if args.json else ""
    if folder and not os.path.isdir(folder):
        parser.error(f"--json: folder {folder} does not exist")


def _quartiles(x) -> tuple[float, float, float]:
    q1, q2, q3 = np.percentile(np.asarray(x, np.float64), [25, 50, 75])
    return float(q2), float(q1), float(q3)


def machine() -> str:
    """CPU model, usable cores, JAX version and backend, in one line."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1] for ln in f if ln.startswith("model name")]
        model = names[0].strip() if names else model
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    dev = jax.devices()[0]
    return (
        f"{model}, {cores or os.cpu_count()} cores; jax {jax.__version__}, "
        f"{dev.platform} backend ({dev.device_kind})"
    )


def _time_rounds(cases, repeats: int, seed: int) -> dict[str, np.ndarray]:
    """Per-round step times; the stream kernel runs _STREAM_RUNS times a round.

    The fastest stream run of a round is its bandwidth: load only ever slows a
    run down, so a limit taken from one unlucky run would put cases below it.
    """
    rng = random.Random(seed)
    stream = next(c for c in cases if c.name == cases_lib.STREAM)
    times = {c.name: [] for c in cases}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            order = list(cases) + [stream] * (_STREAM_RUNS - 1)
            rng.shuffle(order)
            runs = {c.name: [] for c in cases}
            for case in order:
                runs[case.name].append(case.run())
            for name, t in runs.items():
                times[name].append(min(t))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {k: np.asarray(v) for k, v in times.items()}


def _ratio_fields(prefix: str, ratios) -> dict:
    med, q1, q3 = _quartiles(ratios)
    return {prefix: med, f"{prefix}_iqr": [q1, q3]}


def _fmt_iqr(q: Sequence[float], width: int = 5, digits: int = 2) -> str:
    return f"[{q[0]:{width}.{digits}f}, {q[1]:{width}.{digits}f}]"


def time_steps(n: int, leaves: int, repeats: int, seed: int) -> list[dict]:
    """Builds and times every case; prints the tables; returns the rows."""
    cases = cases_lib.timing_cases(n, leaves, seed)
    for i, case in enumerate(cases):
        case.build()
        print(
            f"built {i + 1}/{len(cases)} {case.name}: {case.build_s:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    slow = max(cases, key=lambda c: c.build_s)
    print(
        f"built {len(cases)} cases (compile + step 1, untimed) in "
        f"{sum(c.build_s for c in cases):.1f} s; slowest {slow.name} "
        f"{slow.build_s:.1f} s"
    )
    undonated = [c.name for c in cases if not c.donated]
    if undonated:
        print(f"WARNING: donation refused for {', '.join(undonated)}")
    times = _time_rounds(cases, repeats, seed)
    stream = times[cases_lib.STREAM]
    stream_bytes = cases[0].ideal_bytes
    bw, bw1, bw3 = _quartiles(stream_bytes / stream)
    print(
        f"streaming limit: {bw / 1e9:.2f} GB/s [IQR {bw1 / 1e9:.2f}, "
        f"{bw3 / 1e9:.2f}] (donated in-place {cases_lib.STREAM}, "
        f"best of {_STREAM_RUNS} per round)\n"
    )
    rows = []
    for c in cases:
        t = times[c.name]
        ms, q1, q3 = _quartiles(1e3 * t)
        row = {
            "kind": "step",
            "case": c.name,
            "twin": c.twin,
            "ms": ms,
            "ms_iqr": [q1, q3],
            "ideal_bytes": c.ideal_bytes,
            "donated": c.donated,
            "build_s": c.build_s,
            "hlo_bytes": c.hlo_bytes,
        }
        row.update(
            _ratio_fields("x_roofline", t / stream * stream_bytes / c.ideal_bytes)
        )
        if c.twin is not None:
            row.update(_ratio_fields("x_twin", t / times[c.twin]))
        rows.append(row)
    _print_steps(rows, stream_bytes / 2)
    rows += _targets(rows, times, stream, stream_bytes)
    by_name = {c.name: c for c in cases}
    net, ref = by_name[cases_lib.NETWORK], by_name[cases_lib.JNP_MEDIAN]
    same = all(
        bool(np.allclose(a, b))
        for a, b in zip(jax.tree.leaves(net.carry), jax.tree.leaves(ref.carry))
    )
    slower, _, _ = _quartiles(times[ref.name] / times[net.name])
    print(f"\n{ref.name} / {net.name}: {slower:.1f}x slower (results equal: {same})")
    rows.append({"kind": "check", "case": "median network == jnp.median", "ok": same})
    return rows


def _hlo_p(row: dict, p_bytes: float) -> str:
    return "-" if row["hlo_bytes"] is None else f"{row['hlo_bytes'] / p_bytes:.1f}"


def _print_steps(rows: list[dict], p_bytes: float) -> None:
    print(
        f"{'case':<42} {'ms/step':>8} {'[IQR ms]':>17} {'x roof':>6} {'HLO P':>6} "
        f"{'x twin':>6} {'[IQR]':>14}  twin"
    )
    for r in rows:
        line = f"{r['case']:<42} {r['ms']:8.2f} {_fmt_iqr(r['ms_iqr'], 7)} "
        line += f"{r['x_roofline']:6.2f} {_hlo_p(r, p_bytes):>6}"
        if r["twin"] is not None:
            line += f" {r['x_twin']:6.2f} {_fmt_iqr(r['x_twin_iqr'])}  {r['twin']}"
        print(line)
    print("\n" + "\n".join(cases_lib.NOTES))


def _targets(rows, times, stream, stream_bytes) -> list[dict]:
    by_name = {r["case"]: r for r in rows}
    out = []
    print(
        f"\n{'target':<62} {'ratio':>6} {'[IQR]':>14} {'HLO':>5} {'target':>12}  result"
    )
    for num, den, low, high in cases_lib.TARGETS:
        hlo = by_name[num]["hlo_bytes"]
        if den == "roofline":
            label = f"{num} x roofline"
            ratios = times[num] / stream * stream_bytes / by_name[num]["ideal_bytes"]
            base = by_name[num]["ideal_bytes"]
        else:
            label = f"{num} / {den}"
            ratios = times[num] / times[den]
            base = by_name[den]["hlo_bytes"]
        row = {"kind": "target", "case": label, "low": low, "high": high}
        row.update(_ratio_fields("ratio", ratios))
        row["ok"] = low <= row["ratio"] <= high
        # The same ratio of XLA's bytes: what a bandwidth-bound step would give.
        row["hlo_ratio"] = hlo / base if hlo and base else None
        hlo_txt = "-" if row["hlo_ratio"] is None else f"{row['hlo_ratio']:.2f}"
        bound = f"<= {high:.2f}" if low == 0 else f"{low:.2f}..{high:.2f}"
        print(
            f"{label:<62} {row['ratio']:6.2f} {_fmt_iqr(row['ratio_iqr'])} "
            f"{hlo_txt:>5} {bound:>12}  {'PASS' if row['ok'] else 'MISS'}"
        )
        out.append(row)
    print(
        "HLO: the same ratio of the bytes the compiled steps read and write by\n"
        "  XLA's cost model (roofline: over the ideal bytes), the ratio where both\n"
        "  steps are bandwidth-bound; the model counts a conditional's costliest\n"
        "  branch, which for the norms is their rarely taken rescue pass"
    )
    return out


def compile_table(leaf_counts: Sequence[int]) -> list[dict]:
    """Lower+compile seconds per transform and its twin at each leaf count."""
    counts = list(leaf_counts)
    print(
        "lower + compile seconds of jax.jit(update), params and loss= passed, "
        f"on {', '.join(map(str, counts))} leaves of 1024 float32"
    )
    cases_lib.compile_seconds(cases_lib.COMPILE_TWINS[cases_lib.EMA](), 1)  # warm-up
    grow = f"{counts[-2]}->{counts[-1]}" if len(counts) > 1 else ""
    print(
        f"\n{'transform':<30}"
        + "".join(f"{f's@{n}':>8}" for n in counts)
        + "".join(f"{f'x@{n}':>7}" for n in counts)
        + f" {'growth ' + grow:>19}  result  twin"
    )
    rows, twin_s = [], {}
    for name, make in cases_lib.COMPILE_TWINS.items():
        twin_s[name] = [cases_lib.compile_seconds(make(), n) for n in counts]
        rows.append({"kind": "compile", "case": name, "twin": None})
        rows[-1].update(leaves=counts, seconds=twin_s[name])
        print(f"{name:<30}" + "".join(f"{x:8.2f}" for x in twin_s[name]), flush=True)
    for name, make, twin in cases_lib.COMPILE_CASES:
        secs = [cases_lib.compile_seconds(make(), n) for n in counts]
        ratios = [a / b for a, b in zip(secs, twin_s[twin])]
        growth = allowed = None
        if len(counts) > 1:
            # Linear in the leaf count plus 25%: 5x from 256 to 1024 leaves.
            growth, allowed = secs[-1] / secs[-2], 1.25 * counts[-1] / counts[-2]
        ok = ratios[-1] <= 2.0 and (growth is None or growth <= allowed)
        rows.append({"kind": "compile", "case": name, "twin": twin})
        rows[-1].update(leaves=counts, seconds=secs, twin_seconds=twin_s[twin])
        rows[-1].update(x_twin=ratios, growth=growth, growth_max=allowed, ok=ok)
        g = "" if growth is None else f"{growth:.2f}x (<= {allowed:.2f})"
        print(
            f"{name:<30}"
            + "".join(f"{x:8.2f}" for x in secs)
            + "".join(f"{x:7.2f}" for x in ratios)
            + f" {g:>19}  {'PASS' if ok else 'MISS':<6}  {twin}",
            flush=True,
        )
    print(
        f"\ntargets: <= 2x the twin's compile time at {counts[-1]} leaves, and "
        "growth <= 1.25x the growth of the leaf count"
    )
    _per_leaf_table(rows)
    return rows


def _per_leaf_table(rows: list[dict], small: int = 8, large: int = 24) -> None:
    """What each leaf adds to the compiled program, next to the twin's.

    Counted from the HLO at ``small`` and ``large`` leaves (the difference
    over ``large - small``): XLA:CPU's compile time grows with these counts
    (docs/benchmarks.md, "What a leaf costs to compile").
    """
    print(
        f"\nper leaf (HLO at {small} and {large} leaves): ops handed to XLA, "
        "kernels compiled, kernels distinct from the other leaves'"
    )
    print(
        f"{'transform':<30}{'ops':>7}{'kernels':>9}{'distinct':>10}{'x twin ops':>12}"
    )
    makers = dict(cases_lib.COMPILE_TWINS)
    makers.update((name, make) for name, make, _ in cases_lib.COMPILE_CASES)
    per_leaf = {}
    for row in rows:
        counts = cases_lib.per_leaf_counts(makers[row["case"]](), small, large)
        per_leaf[row["case"]] = row["per_leaf"] = counts
        twin = "" if row["twin"] is None else per_leaf[row["twin"]]["ops"]
        ratio = f"{counts['ops'] / twin:12.2f}" if twin else ""
        print(
            f"{row['case']:<30}{counts['ops']:7.1f}{counts['kernels']:9.2f}"
            f"{counts['distinct']:10.2f}{ratio}",
            flush=True,
        )


def run(args: argparse.Namespace, command: str) -> list[dict]:
    """Runs the benchmark for parsed ``args``; prints it and returns the rows."""
    print(f"machine: {machine()}")
    print(f"command: {command}")
    if args.compile:
        rows = compile_table(args.compile_leaves)
    else:
        print(
            f"size: {args.size} float32 in {args.leaves} leaves "
            f"({4 * args.size / 2**20:.1f} MiB), {args.repeats} rounds, "
            f"seed {args.seed}"
        )
        rows = time_steps(args.size, args.leaves, args.repeats, args.seed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


def main(argv: Sequence[str] | None = None, prog: str = "optax-stab bench"):
    """Parses ``argv`` (default ``sys.argv[1:]``) and runs; returns the rows.

    Raises:
        SystemExit: With code 2 and a one-line message on a bad flag or value.
    """
    from optax_stab import _cli

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _cli.OneLineErrorParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    return run(args, " ".join([prog, *argv]))


if __name__ == "__main__":
    main()
