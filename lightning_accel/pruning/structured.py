"""Structured pruning: remove whole channels, neurons and attention heads with torch-pruning.

Zeroed weights make a model compressible, not faster; removing whole channels makes every layer
physically smaller. The framework-free core (no Trainer) is built on torch-pruning's dependency graph,
which finds the layers that must shrink together (residual adds, BatchNorm, concatenations, fused ``qkv``
projections). This module is its one-call API, :func:`prune_structured_`, and re-exports each step from the
module that computes it:

* :func:`build_pruning_graph` (:mod:`~lightning_accel.pruning.graph`) traces a model once and lists its
  *prunable groups*: channels of conv/linear groups, and attention heads (or head dimensions) of
  ``nn.MultiheadAttention`` and of modules that carry a head count (``num_heads``, Hugging Face
  ``num_attention_heads``, ...) and a fused ``qkv`` Linear (or ``q``/``k``/``v``, ``query``/``key``/``value``,
  ``q_proj``... Linears); their head attributes and a Hugging Face ``config.num_attention_heads`` follow.
  Attention of any other layout is refused (:func:`check_attention_layouts`,
  :mod:`~lightning_accel.pruning.attention`).
* :func:`plan_structured_pruning` (:mod:`~lightning_accel.pruning.plan`) ranks units by importance (``l1``,
  ``l2``, ``taylor``, ``bn_scale``, ``random``) and decides which to remove so each group (``scope="layer"``) or
  the whole model (``scope="global"``) reaches ``amount`` of its *original* size. The plan is plain data, so
  under DDP one rank can decide and broadcast it.
* :func:`apply_pruning_plan_` (:mod:`~lightning_accel.pruning.apply`) removes the planned units in place, checks
  that the model still runs (rolling back and naming the failing module otherwise) and returns the recorded
  history plus, for every replaced parameter, the kept indices (:class:`ParamSlice`).
* :func:`slice_optimizer_` (:mod:`~lightning_accel.pruning.optimizer_state`) re-binds optimizer parameters in
  place and slices their state (momentum, Adam moments) to the kept indices.
* :func:`replay_pruning_` (:mod:`~lightning_accel.pruning.replay`) re-applies a recorded history to a freshly
  built model before its weights load; it needs no example input and leaves the model untouched when the
  history does not fit.
* :func:`build_group_regularizer` (:mod:`~lightning_accel.pruning.regularizer`) pushes whole groups toward zero
  before they are removed; :func:`count_macs_params` (:mod:`~lightning_accel.pruning.macs`) measures the result.

    graph = build_pruning_graph(model, torch.zeros(1, 1, 8, 8))
    result = prune_structured_(model, torch.zeros(1, 1, 8, 8), amount=0.5, optimizers=[opt])
    replay_pruning_(fresh_model, [result.record()])        # same shapes, ready for load_state_dict
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_accel.errors import StructuredPruningError, StructuredPruningWarning
from lightning_accel.pruning.apply import ParamSlice, PruningResult, apply_pruning_plan_
from lightning_accel.pruning.attention import check_attention_layouts, sync_configs_, unknown_attention
from lightning_accel.pruning.graph import PruningGraph, build_pruning_graph
from lightning_accel.pruning.macs import count_macs_params
from lightning_accel.pruning.optimizer_state import slice_optimizer_
from lightning_accel.pruning.plan import IMPORTANCES, SCOPES, plan_structured_pruning
from lightning_accel.pruning.regularizer import build_group_regularizer
from lightning_accel.pruning.replay import replay_pruning_

__all__ = [
    "IMPORTANCES",
    "SCOPES",
    "ParamSlice",
    "PruningGraph",
    "PruningResult",
    "StructuredPruningError",
    "StructuredPruningWarning",
    "apply_pruning_plan_",
    "build_group_regularizer",
    "build_pruning_graph",
    "check_attention_layouts",
    "count_macs_params",
    "plan_structured_pruning",
    "prune_structured_",
    "replay_pruning_",
    "slice_optimizer_",
    "sync_configs_",
    "unknown_attention",
]


def prune_structured_(
    model: nn.Module,
    example_inputs: Any,
    amount: float = 0.5,
    *,
    scope: str = "layer",
    importance: str = "l2",
    max_layer_amount: float = 0.9,
    exclude: Sequence[str] | None = None,
    round_to: int | None = None,
    prune_heads: bool = True,
    original: Mapping[str, int] | None = None,
    grads: Mapping[str, torch.Tensor] | None = None,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    reset_optimizer_state: bool = False,
    seed: int = 0,
    event: int = 0,
) -> PruningResult:
    """Prune ``model`` in place to ``amount`` of its channels and heads, and fix ``optimizers`` to match.

    One call of :func:`build_pruning_graph`, :func:`plan_structured_pruning`, :func:`apply_pruning_plan_` and
    :func:`slice_optimizer_`; see them for the arguments.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> _ = prune_structured_(model, torch.zeros(1, 8), amount=0.5)
        >>> model[0].out_features
        8

    Raises:
        NoMatchError: an ``exclude`` pattern matches nothing.
        StructuredPruningError: the model cannot be traced, or does not run once pruned (it is restored).
    """
    graph = build_pruning_graph(model, example_inputs, exclude=exclude, prune_heads=prune_heads)
    plan = plan_structured_pruning(
        graph,
        amount,
        scope=scope,
        importance=importance,
        max_layer_amount=max_layer_amount,
        round_to=round_to,
        original=original,
        grads=grads,
        seed=seed,
        event=event,
    )
    result = apply_pruning_plan_(graph, plan)
    for opt in optimizers:
        slice_optimizer_(opt, result.slices, reset=reset_optimizer_state)
    return result
