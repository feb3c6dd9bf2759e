"""Measuring a model's cost: :func:`count_macs_params` counts the multiply-accumulates of one forward and the
parameters, the figures structured pruning reports.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_accel.pruning.tracing import call_model, prepare_inputs, run_eagerly

__all__ = ["count_macs_params"]


def count_macs_params(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """Multiply-accumulates of one forward on ``example_inputs`` and the number of parameters.

    MACs are half of the FLOPs that :class:`torch.utils.flop_counter.FlopCounterMode` counts for matrix
    products and convolutions (attention kernels count where torch registers a formula for them).
    """
    inputs = prepare_inputs(model, example_inputs)
    with run_eagerly(model, grad=False):
        model.eval()
        with FlopCounterMode(display=False) as counter:
            call_model(model, inputs)
    params = sum(p.numel() for p in model.parameters())
    return int(counter.get_total_flops()) // 2, int(params)
