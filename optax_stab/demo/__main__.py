"""``python -m optax_stab.demo``: the same as ``optax-stab demo``."""

import sys

from optax_stab import _cli

if __name__ == "__main__":
    sys.exit(_cli.main(["demo", *sys.argv[1:]]))
