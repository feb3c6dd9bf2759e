"""Pruning: unstructured masks and structured removal of channels, neurons and heads.

* :mod:`~lightning_accel.pruning.unstructured`: the pure core of unstructured pruning (:func:`prune_`,
  :func:`compute_masks`, :func:`apply_masks_`, ...).
* :mod:`~lightning_accel.pruning.structured`: the pure core of structured pruning over torch-pruning
  (:func:`prune_structured_`, :func:`plan_structured_pruning`, :func:`replay_pruning_`, ...).
* :mod:`~lightning_accel.pruning._base`: :class:`BasePruning`, the schedule and its hooks both callbacks share.
* :mod:`~lightning_accel.pruning.callbacks`: :class:`ScheduledPruning`, :class:`StructuredPruning`,
  :func:`load_pruned`.
"""

from lightning_accel.pruning._base import BasePruning
from lightning_accel.pruning.callbacks import (
    PruningNoEffectWarning,
    ScheduledPruning,
    StructuredPruning,
    load_pruned,
)
from lightning_accel.pruning.unstructured import (
    apply_masks_,
    compute_masks,
    compute_masks_with_counts,
    count_kept,
    mask_grads_,
    mask_sparsity,
    prunable_parameters,
    prune_,
    regularize_grads_,
)

__all__ = [
    "BasePruning",
    "PruningNoEffectWarning",
    "ScheduledPruning",
    "StructuredPruning",
    "apply_masks_",
    "compute_masks",
    "compute_masks_with_counts",
    "count_kept",
    "load_pruned",
    "mask_grads_",
    "mask_sparsity",
    "prunable_parameters",
    "prune_",
    "regularize_grads_",
]
