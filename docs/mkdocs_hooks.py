"""MkDocs hook: ``--strict`` counts warnings even under ``--quiet``.

``mkdocs build --quiet`` lowers the ``mkdocs`` logger to ERROR, so the
warnings that ``--strict`` counts (an unresolved cross-reference, a broken
link) are dropped before they are counted and the strict build passes.
Under ``--strict`` this hook keeps the logger at WARNING: warnings are printed
and abort the build; INFO lines stay quiet.
"""

from __future__ import annotations

import logging
from typing import Any


def on_config(config: Any, **kwargs: Any) -> None:
    del kwargs
    logger = logging.getLogger("mkdocs")
    if config.strict and logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)
