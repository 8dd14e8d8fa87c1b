"""``python -m optax_stab``: the same as the ``optax-stab`` command."""

import sys

from optax_stab import _cli

if __name__ == "__main__":
    sys.exit(_cli.main())
