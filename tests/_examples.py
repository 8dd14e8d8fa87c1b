"""Loads the scripts in ``examples/`` (and ``benchmarks/``) as modules, for tests."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
BENCHMARKS = EXAMPLES.parent / "benchmarks"


def load_example(name: str, folder: pathlib.Path = EXAMPLES) -> types.ModuleType:
    """Imports ``<folder>/<name>.py`` as run as a script (its folder on the path)."""
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(
        f"{folder.name}_{name}", folder / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
