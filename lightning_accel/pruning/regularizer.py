"""Group regularization before pruning: :func:`build_group_regularizer` builds torch-pruning's group-lasso
regularizer over the groups :func:`~lightning_accel.pruning.graph.build_pruning_graph` would prune, so unimportant
channels fade before they are removed.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from lightning_accel._select import output_layer_name
from lightning_accel.pruning.attention import find_attention, head_count
from lightning_accel.pruning.tracing import (
    ROOT_TYPES,
    call_model,
    prepare_inputs,
    resolve_exclude,
    run_eagerly,
    unwrapped_parameters,
)

__all__ = ["build_group_regularizer"]


class _GroupRegularizer(tp.pruner.GroupNormPruner):
    """torch-pruning's group-lasso regularizer, skipping groups whose channels all score alike (its
    ``gamma = alpha ** ((max - imp) / (max - min))`` would be NaN there and poison the gradients)."""

    def estimate_importance(self, group: Any) -> torch.Tensor:
        imp = super().estimate_importance(group)
        if imp is None or imp.numel() < 2 or not bool(imp.max() > imp.min()):
            return torch.full((1,), float("nan"))
        return imp


def build_group_regularizer(
    model: nn.Module,
    example_inputs: Any,
    strength: float,
    *,
    exclude: Sequence[str] | None = None,
    prune_heads: bool = True,
) -> Any:
    """torch-pruning's ``GroupNormPruner`` over the groups :func:`build_pruning_graph` would prune: call its
    ``regularize(model)`` after every backward (before the optimizer step) to push the gradients of whole
    groups toward zero, so unimportant channels fade before they are removed.

    Args:
        model: the model, traced on ``example_inputs`` (train/eval flags restored).
        example_inputs: as for :func:`build_pruning_graph`.
        strength: the regularization coefficient, e.g. ``1e-4``.
        exclude: as for :func:`build_pruning_graph`; the output layer is always left alone.
        prune_heads: as for :func:`build_pruning_graph`.

    Returns:
        The regularizer. Rebuild it after the model's shapes change.
    """
    excluded, _ = resolve_exclude(model, exclude)
    head = output_layer_name(model)
    if head is not None:
        excluded.update(model.get_submodule(head).modules())
    num_heads = {layer: head_count(attn) for attn, layers in find_attention(model).values() for layer in layers}
    inputs = prepare_inputs(model, example_inputs)
    with run_eagerly(model, grad=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _GroupRegularizer(
            model,
            inputs,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            reg=float(strength),
            ignored_layers=list(excluded),
            in_channel_groups={},
            out_channel_groups={},
            num_heads=num_heads,
            prune_num_heads=prune_heads,
            prune_head_dims=not prune_heads,
            unwrapped_parameters=unwrapped_parameters(model),
            root_module_types=list(ROOT_TYPES),
            forward_fn=call_model,
        )
