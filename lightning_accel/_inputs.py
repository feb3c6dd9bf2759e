"""Example inputs for tracing and measuring a LightningModule, without user code: the module's
``example_input_array`` when it is set, otherwise the first sample of a training batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["example_from_batch"]


def example_from_batch(module: nn.Module, batch: Any, who: str, error: type[Exception] = ValueError) -> Any:
    """``module.example_input_array`` if set, else the first sample of ``batch`` (a tensor, or the first tensor
    of a tuple/list batch), keeping its batch dimension.

    Raises:
        error: neither gives a tensor; the message, starting with ``who``, says to set ``example_input_array``.
    """
    example = getattr(module, "example_input_array", None)
    if example is not None:
        return example
    x = batch
    if isinstance(x, (list, tuple)) and x:
        x = x[0]
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        return x[:1]
    raise error(
        f"{who} needs an example input to trace {type(module).__name__}; the first batch's first element is a "
        f"{type(x).__name__}, not a tensor. Set `self.example_input_array` in the LightningModule."
    )
