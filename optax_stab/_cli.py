"""The ``optax-stab`` command: subcommands ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from optax_stab import _bench


class OneLineErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> tuple[
    argparse.ArgumentParser, dict[str, argparse.ArgumentParser]
]:
    """The ``optax-stab`` parser and its subcommand parsers by name."""
    from optax_stab.demo import cli as demo_cli

    parser = OneLineErrorParser(
        prog="optax-stab",
        description="Optax gradient transformations that keep training stable.",
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=OneLineErrorParser
    )
    demo = sub.add_parser(
        "demo",
        help="stability shoot-out of optimizer chains on real tasks (see demo --help)",
        description=demo_cli.description(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo_cli.add_arguments(demo)
    bench = sub.add_parser(
        "bench",
        help="time the transforms vs optax and the memory-bandwidth roofline",
        description=_bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _bench.add_arguments(bench)
    return parser, {"demo": demo, "bench": bench}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``optax-stab`` console script.

    Args:
        argv: Arguments after the program name; ``None`` means ``sys.argv[1:]``.

    Returns:
        The exit code (0). Bad flags exit with code 2 and a one-line message.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # Parsed by the benchmark alone: it needs no demo (and no flax).
        _bench.main(argv[1:], prog="optax-stab bench")
        return 0
    from optax_stab.demo import cli as demo_cli

    parser, subparsers = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        plan = demo_cli.resolve(args)
    except demo_cli.ArgumentError as e:
        subparsers[args.command].error(str(e))
    demo_cli.run(plan, argv[1:])
    return 0
