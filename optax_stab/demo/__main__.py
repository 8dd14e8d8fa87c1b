"""``python -m optax_stab.demo``: the same as ``optax-stab demo``."""

import sys

from optax_stab.demo.cli import main

if __name__ == "__main__":
    sys.exit(main())
