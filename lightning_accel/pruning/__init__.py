"""Pruning: unstructured masks and structured removal of channels, neurons and heads.

Cores, each named for what it computes (plain ``torch.nn.Module`` functions, no Trainer):

* :mod:`~lightning_accel.pruning.unstructured`: unstructured pruning (:func:`prune_`, :func:`compute_masks`,
  :func:`apply_masks_`, ...) and masks in checkpoints and across ranks.
* structured pruning over torch-pruning, one module per step: :mod:`~lightning_accel.pruning.tracing` (how a
  model is traced and run), :mod:`~lightning_accel.pruning.attention` (attention layouts and head counts),
  :mod:`~lightning_accel.pruning.graph` (:func:`build_pruning_graph`), :mod:`~lightning_accel.pruning.plan`
  (:func:`plan_structured_pruning`), :mod:`~lightning_accel.pruning.apply` (:func:`apply_pruning_plan_` and its
  rollback, :func:`snapshot_structure` / :func:`restore_structure`), :mod:`~lightning_accel.pruning.optimizer_state`
  (:func:`slice_optimizer_`), :mod:`~lightning_accel.pruning.replay` (:func:`replay_pruning_`),
  :mod:`~lightning_accel.pruning.regularizer` (:func:`build_group_regularizer`), :mod:`~lightning_accel.pruning.macs`
  (:func:`count_macs_params`); :mod:`~lightning_accel.pruning.structured` holds the one-call
  :func:`prune_structured_` and re-exports the rest.

The Trainer's side:

* :mod:`~lightning_accel.pruning.base`: :class:`BasePruning`, the schedule and its hooks both callbacks share.
* :mod:`~lightning_accel.pruning.callbacks`: :class:`ScheduledPruning`, :class:`StructuredPruning`,
  :func:`load_pruned`.
"""

from lightning_accel.pruning.base import BasePruning
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
