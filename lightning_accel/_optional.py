"""Importing optional third-party libraries quietly: torchao, on a CPU build, logs notices about CUDA-only
extensions it cannot load and warns about its own internals at import; neither concerns the user."""

from __future__ import annotations

import importlib
import logging
import warnings
from types import ModuleType

__all__ = ["quiet_import"]


def quiet_import(name: str, logger: str = "torchao") -> ModuleType:
    """``importlib.import_module(name)`` with ``logger`` held at ERROR and warnings ignored while it imports.

    Raises:
        ImportError: as the import does.
    """
    quiet = logging.getLogger(logger)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    finally:
        quiet.setLevel(level)
