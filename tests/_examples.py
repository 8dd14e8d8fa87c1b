"""Loads the scripts in ``examples/`` as modules, for the tests that run them."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> types.ModuleType:
    """Imports ``examples/<name>.py`` as it runs as a script (examples on the path)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
