"""Pruning: unstructured masks on a schedule (:class:`ScheduledPruning` over :func:`prune_`)."""

from lightning_accel.pruning.scheduled import PruningNoEffectWarning, ScheduledPruning
from lightning_accel.pruning.structured_callback import StructuredPruning as StructuredPruning
from lightning_accel.pruning.structured_callback import load_pruned as load_pruned
from lightning_accel.pruning.unstructured import (
    apply_masks_,
    compute_masks,
    mask_grads_,
    mask_sparsity,
    prunable_parameters,
    prune_,
    regularize_grads_,
)

__all__ = [
    "PruningNoEffectWarning",
    "ScheduledPruning",
    "apply_masks_",
    "compute_masks",
    "mask_grads_",
    "mask_sparsity",
    "prunable_parameters",
    "prune_",
    "regularize_grads_",
]
