"""Replaying a :class:`~lightning_accel.Quantization` record: a freshly built float model gets the quantized layers and
adapters a checkpoint was saved with, before its weights load.

The record names the user-facing backend that quantized (``"bitsandbytes"``, ``"torchao"``; absent in 0.1.0
checkpoints: bitsandbytes); every registered backend of that family replays its own part of the record
(:meth:`~lightning_accel.quantization.backends.QuantizationBackend.replay_`), then the adapters are added back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_accel.quantization.adapters import replay_adapters_
from lightning_accel.quantization.backends import backends_of

__all__ = ["DEFAULT_RECORDED_BACKEND", "replay_quantization"]

#: The backend of a record that names none (written by 0.1.0, which had bitsandbytes only).
DEFAULT_RECORDED_BACKEND = "bitsandbytes"


def replay_quantization(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Recreate the quantized layers and adapters a :class:`~lightning_accel.Quantization` state records, in place,
    so that the checkpoint's weights load into ``model``. Layers already quantized as recorded are left alone.

    Raises:
        ValueError: ``model`` is quantized differently from the record (other layers, mode or adapters), or the
            record names a backend that is not registered.
    """
    if not state.get("applied"):
        return
    for backend in backends_of(state.get("backend") or DEFAULT_RECORDED_BACKEND):
        backend.replay_(model, state)
    adapters = list(state.get("adapters") or [])
    if adapters:
        replay_adapters_(
            model, adapters, int(state["adapter_rank"]), float(state["adapter_alpha"]), float(state["adapter_dropout"])
        )
