"""``optax-stab demo``: a stability shoot-out of optimizer chains on real tasks.

Run it as ``optax-stab demo`` or ``python -m optax_stab.demo``; ``--help``
lists the tasks, chains and flags. Modules: :mod:`~optax_stab.demo.tasks`
(models and data), :mod:`~optax_stab.demo.chains` (the compared chains),
:mod:`~optax_stab.demo.runner` (one vmapped, jitted scan per task),
:mod:`~optax_stab.demo.report` (statistics, table, JSON, Markdown),
:mod:`~optax_stab.demo.plots` (PNG files) and :mod:`~optax_stab.demo.cli`.

The demo needs the ``demo`` extra (``pip install "optax_stab[demo]"``); the
core library and ``optax-stab bench`` do not. Importing this package imports
none of the extra's modules: :func:`demo` and :func:`main` load
:mod:`~optax_stab.demo.cli` (and with it Flax) on first use, so the
``optax-stab`` command can check :func:`missing_requirements` first.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

#: The ``demo`` extra of pyproject.toml: distribution name -> module imported.
REQUIREMENTS: dict[str, str] = {
    "flax": "flax",
    "scikit-learn": "sklearn",
    "matplotlib": "matplotlib",
    "rich": "rich",
}

INSTALL_HINT = 'pip install "optax_stab[demo]"'


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        # A finder that refuses the name, or a ``None`` entry in sys.modules.
        return False


def missing_requirements() -> list[str]:
    """Distributions of the ``demo`` extra that cannot be imported, in order.

    Only looks the modules up (``importlib.util.find_spec``); imports nothing.
    """
    return [dist for dist, module in REQUIREMENTS.items() if not _importable(module)]


def __getattr__(name: str) -> Any:
    # ``optax_stab.demo.demo`` and ``.main`` without importing Flax at import.
    if name in ("demo", "main"):
        cli = importlib.import_module("optax_stab.demo.cli")
        return getattr(cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["INSTALL_HINT", "REQUIREMENTS", "demo", "main", "missing_requirements"]
