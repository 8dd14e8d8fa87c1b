"""The ``optax-stab`` command: subcommands ``demo`` and ``bench``, ``--version``.

Only ``optax-stab demo`` needs the ``demo`` extra (Flax, scikit-learn,
matplotlib, rich): ``--help``, ``--version`` and ``bench`` import none of it,
so they work after a plain ``pip install optax_stab``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence

from optax_stab import _bench
from optax_stab import demo as demo_lib  # the package alone imports no Flax

DISTRIBUTION = "optax_stab"


class OneLineErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def version() -> str:
    """The installed distribution's version, else ``optax_stab.__version__``."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        # Run from a source tree that was never installed.
        import optax_stab

        return optax_stab.__version__


def build_parser() -> argparse.ArgumentParser:
    """The ``optax-stab`` parser: ``--help``, ``--version`` and the command list.

    The subcommands parse their own flags (:func:`main` hands them the rest of
    the command line), so listing ``demo`` here imports nothing of the demo.
    """
    parser = OneLineErrorParser(
        prog="optax-stab",
        description="Optax gradient transformations that keep training stable.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=OneLineErrorParser
    )
    sub.add_parser(
        "demo",
        help="stability shoot-out of optimizer chains on real tasks (needs the "
        f"demo extra: {demo_lib.INSTALL_HINT}; see demo --help)",
    )
    sub.add_parser(
        "bench",
        help="time the transforms vs optax and the memory-bandwidth roofline "
        "(see bench --help)",
    )
    return parser


def _demo(argv: list[str]) -> None:
    """``optax-stab demo ARGV``; without the demo extra, one line and exit 2."""
    prog = "optax-stab demo"
    missing = demo_lib.missing_requirements()
    if missing:
        sys.stderr.write(
            f"{prog}: error: the demo needs {', '.join(missing)}, not installed; "
            f"install the demo extra: {demo_lib.INSTALL_HINT}\n"
        )
        raise SystemExit(2)
    demo_lib.demo(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``optax-stab`` console script and ``python -m optax_stab``.

    Args:
        argv: Arguments after the program name; ``None`` means ``sys.argv[1:]``.

    Returns:
        The exit code (0). Bad flags exit with code 2 and a one-line message.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        _bench.main(argv[1:], prog="optax-stab bench")
        return 0
    if argv[:1] == ["demo"]:
        _demo(argv[1:])
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
    return 0
