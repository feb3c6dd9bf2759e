"""lightning-accel: drop-in PyTorch Lightning callbacks for faster training and smaller, faster models.

Every technique is a pure function on a plain ``torch.nn.Module`` (``prune_``, ``quantize_``, ...)
under a thin :class:`lightning.pytorch.Callback` that decides when to apply it. Public names are
imported lazily, so ``import lightning_accel`` stays cheap and an optional dependency is only
needed by the technique that uses it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # composition
    "AccelCallback": "lightning_accel._compose",
    "CompositionError": "lightning_accel._compose",
    "notify_structure_changed": "lightning_accel._compose",
    # checkpoints
    "load_checkpoint": "lightning_accel.checkpoint",
    "register_replay": "lightning_accel.checkpoint",
    # schedules
    "sparsity_at": "lightning_accel.schedules",
    # selection
    "select_modules": "lightning_accel._select",
    "NoMatchError": "lightning_accel._select",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_accel' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - static names for type checkers and IDEs
    from lightning_accel._compose import AccelCallback, CompositionError, notify_structure_changed
    from lightning_accel._select import NoMatchError, select_modules
    from lightning_accel.checkpoint import load_checkpoint, register_replay
    from lightning_accel.schedules import sparsity_at
