"""Loading checkpoints of models that lightning-accel callbacks changed, without a Trainer.

``LightningModule.load_from_checkpoint`` runs no callbacks, so a checkpoint of a pruned, quantized or
adapted model does not fit a freshly built model. Each technique registers a *replay* function that
re-applies its recorded change (pruning history, quantized-layer swaps, adapters) to a plain model from
its callback state in the checkpoint; :func:`load_checkpoint` runs those replays in pipeline order, then
loads the weights.

    model = lightning_accel.load_checkpoint(ResidualCNN, "last.ckpt")        # class: built from hparams
    lightning_accel.load_checkpoint(my_model, "last.ckpt")                     # or an instance, in place
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["register_replay", "load_checkpoint", "replay_callbacks"]

#: callback class name -> (order, replay(model, callback_state))
_REPLAYS: dict[str, tuple[int, Callable[[nn.Module, dict[str, Any]], None]]] = {}


def register_replay(name: str, order: int, fn: Callable[[nn.Module, dict[str, Any]], None]) -> None:
    """Register how to re-apply callback ``name``'s recorded change to a plain model.

    Args:
        name: the callback's class name; checkpoint states whose ``state_key`` is ``name`` or starts
            with ``name + "{"`` (Lightning's ``_generate_state_key``) are replayed with ``fn``.
        order: pipeline order (as ``AccelCallback.order``); lower replays first.
        fn: ``fn(model, state)``, changing ``model`` in place from the callback's ``state_dict()``.
    """
    _REPLAYS[name] = (order, fn)


def _owner(state_key: str) -> str:
    return state_key.split("{", 1)[0]


def replay_callbacks(model: nn.Module, checkpoint: dict[str, Any]) -> list[str]:
    """Re-apply every registered change recorded in ``checkpoint["callbacks"]``; returns the keys replayed."""
    _import_techniques()
    found = []
    for key, state in (checkpoint.get("callbacks") or {}).items():
        entry = _REPLAYS.get(_owner(key))
        if entry is not None:
            found.append((entry[0], key, entry[1], state))
    for _, _, fn, state in sorted(found, key=lambda t: t[0]):
        fn(model, state)
    return [k for _, k, _, _ in sorted(found, key=lambda t: t[0])]


def load_checkpoint(
    model: nn.Module | type,
    checkpoint: str | Path | dict[str, Any],
    *,
    map_location: Any = "cpu",
    strict: bool = True,
    **init_kwargs: Any,
) -> nn.Module:
    """Build (or take) a model, replay the recorded lightning-accel changes, then load the weights.

    Args:
        model: a model instance (changed in place) or a LightningModule class (built from the checkpoint's
            ``hyper_parameters``, updated by ``init_kwargs``).
        checkpoint: a path, or an already loaded checkpoint dict.
        map_location: as for :func:`torch.load`.
        strict: as for :meth:`torch.nn.Module.load_state_dict`.

    Returns:
        The model, in eval mode.
    """
    ckpt = checkpoint if isinstance(checkpoint, dict) else torch.load(checkpoint, map_location=map_location, weights_only=False)
    if isinstance(model, type):
        hparams = dict(ckpt.get("hyper_parameters") or {})
        hparams.update(init_kwargs)
        model = model(**hparams)
    assert isinstance(model, nn.Module)
    replay_callbacks(model, ckpt)
    model.load_state_dict(ckpt["state_dict"], strict=strict)
    return model.eval()


def _import_techniques() -> None:
    """Import the technique modules so their replays are registered (they register at import)."""
    import importlib

    for mod in (
        "lightning_accel.pruning",
        "lightning_accel.quantization",
    ):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:  # a technique not present in this build
            if err.name != mod:
                raise
