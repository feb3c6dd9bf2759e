"""The setup-time path of :class:`~lightning_accel.Quantization` (``when="setup"``): training on a frozen quantized
base, QLoRA-style.

Before the optimizers are built, DDP wraps the model or a checkpoint is restored, the selected layers are replaced
by frozen quantized layers of a backend that trains (``trainable_base``: bitsandbytes), optionally with a low-rank
adapter each and every parameter but the adapters and the ``trainable`` modules frozen. The fit-end path is
:mod:`~lightning_accel.quantization.ptq`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_accel.errors import QuantizationNoEffectWarning
from lightning_accel.quantization.adapters import adapted_layers, add_adapters_, freeze_except_adapters_
from lightning_accel.quantization.backends import (
    QuantConfig,
    footprint_of,
    parameter_counts,
)
from lightning_accel.quantization.plan import (
    Family,
    choose_layers,
    describe,
    layer_counts,
    quantization_record,
)

__all__ = ["check_setup_args", "quantize_for_training_", "warn_unused_adapter_args"]


def check_setup_args(*, max_metric_drop: float | None) -> None:
    """The argument rules of ``when="setup"``.

    Raises:
        ValueError: ``max_metric_drop`` is set (it guards post-training quantization only).
    """
    if max_metric_drop is not None:
        raise ValueError(
            f"`max_metric_drop`={max_metric_drop} only applies with `when`='fit_end' (post-training quantization); "
            "got when='setup'"
        )


def warn_unused_adapter_args(*, adapter_rank: int, adapter_alpha: float, adapter_dropout: float, trainable: Any) -> None:
    """Warn (:class:`~lightning_accel.QuantizationNoEffectWarning`) about adapter settings without adapters."""
    if trainable is not None and not adapter_rank:
        rank_zero_warn("`trainable` has no effect with `adapter_rank`=0 (no adapters to train)", category=QuantizationNoEffectWarning)
    if not adapter_rank and (adapter_alpha != 16.0 or adapter_dropout):
        rank_zero_warn("`adapter_alpha` and `adapter_dropout` have no effect with `adapter_rank`=0", category=QuantizationNoEffectWarning)


def quantize_for_training_(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    family: Family,
    config: QuantConfig,
    *,
    modules: Sequence[str] | None,
    exclude: Sequence[str] | None,
    layer_bits: Any,
    adapter_rank: int,
    adapter_alpha: float,
    adapter_dropout: float,
    trainable: list[str] | None,
) -> dict[str, Any]:
    """Quantize ``pl_module``'s selected layers with ``family`` for training, add adapters, freeze the rest, log;
    returns the record a checkpoint keeps. A model already quantized (the same model set up again for ``test``
    after ``fit``, or quantized by the user) only gets its adapters and freezing back.

    Raises:
        NoMatchError: a pattern selects nothing, or the model has no layer to quantize.
        ValueError: ``layer_bits`` names layers that are not selected.
    """
    if any(b.quantized_layers(pl_module) for b in family):
        if adapter_rank and not adapted_layers(pl_module):
            add_adapters_(pl_module, adapter_rank, adapter_alpha, adapter_dropout)
        if adapter_rank:
            freeze_except_adapters_(pl_module, trainable)
        return quantization_record(pl_module, family, config, adapter_alpha, adapter_dropout)
    chosen = choose_layers(pl_module, family, config, modules, exclude, layer_bits)
    broadcast_from_rank_zero(trainer, (layer for layers in chosen.values() for layer in layers.values()))
    for b in family:
        b.quantize_(pl_module, chosen[b.name], config)
    if adapter_rank:
        add_adapters_(pl_module, adapter_rank, adapter_alpha, adapter_dropout)
        freeze_except_adapters_(pl_module, trainable)
    record = quantization_record(pl_module, family, config, adapter_alpha, adapter_dropout)
    counts = parameter_counts(pl_module)
    foot = footprint_of(pl_module, family)
    adapters = f", adapters of rank {adapter_rank} on each" if adapter_rank else ""
    rank_zero_info(
        f"Quantization: {layer_counts(foot, family)} -> {describe(family, config)} on {trainer.strategy.root_device}"
        f"{adapters}; {foot['bits_per_weight']:.3f} stored bits per quantized weight; {counts['trainable']:,} of "
        f"{counts['total']:,} parameters trainable ({counts['trainable'] / max(counts['total'], 1):.2%})"
    )
    return record


def broadcast_from_rank_zero(trainer: pl.Trainer, layers: Iterable[nn.Module]) -> None:
    """Under DDP, give every rank rank zero's float weights before quantizing: quantization statistics are not
    parameters, so DDP's own broadcast at wrap time could not reconcile ranks that started from different weights."""
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    device = trainer.strategy.root_device
    with torch.no_grad():
        for layer in layers:
            for p in (layer.weight, layer.bias):
                if isinstance(p, torch.Tensor):
                    t = p.detach().to(device)
                    torch.distributed.broadcast(t, src=0)
                    p.copy_(t)
