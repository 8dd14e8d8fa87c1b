"""``optax-stab demo``: a stability shoot-out of optimizer chains on real tasks.

Run it as ``optax-stab demo`` or ``python -m optax_stab.demo``; ``--help``
lists the tasks, chains and flags. Modules: :mod:`~optax_stab.demo.tasks`
(models and data), :mod:`~optax_stab.demo.chains` (the compared chains),
:mod:`~optax_stab.demo.runner` (one vmapped, jitted scan per task),
:mod:`~optax_stab.demo.report` (statistics, table, JSON, Markdown),
:mod:`~optax_stab.demo.plots` (PNG files) and :mod:`~optax_stab.demo.cli`.
"""

from optax_stab.demo.cli import demo, main

__all__ = ["demo", "main"]
