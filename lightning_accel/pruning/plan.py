"""Which units to remove: :func:`plan_structured_pruning` ranks each group's units by importance (``l1``, ``l2``,
``taylor``, ``bn_scale``, ``random``) and decides which go so each group (``scope="layer"``) or the whole model
(``scope="global"``) reaches ``amount`` of its *original* size. The plan is plain data, so under DDP one rank can
decide and broadcast it.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from lightning_accel._validate import check_choice
from lightning_accel.errors import StructuredPruningWarning
from lightning_accel.pruning.graph import PrunableGroup, PruningGraph

__all__ = ["IMPORTANCES", "SCOPES", "plan_structured_pruning"]


#: Importance criteria: group L1/L2 magnitude, first-order Taylor (|w * grad|), BatchNorm scale, seeded random.
IMPORTANCES: tuple[str, ...] = ("l1", "l2", "taylor", "bn_scale", "random")
#: ``layer``: every group loses ``amount`` of its units; ``global``: ``amount`` of all units, ranked together.
SCOPES: tuple[str, ...] = ("layer", "global")

_EPS = 1e-9


@contextlib.contextmanager
def _grads_swapped(model: nn.Module, grads: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """Temporarily set every parameter's ``.grad`` to ``grads[name]`` (zeros where missing)."""
    saved = []
    for name, p in model.named_parameters():
        saved.append((p, p.grad))
        g = None if grads is None else grads.get(name)
        p.grad = g.to(p.device, p.dtype) if g is not None and g.shape == p.shape else torch.zeros_like(p)
    try:
        yield
    finally:
        for p, g in saved:
            p.grad = g


def _seed_for(seed: int, event: int, key: str) -> int:
    return (seed * 1_000_003 + event * 7_919 + zlib.crc32(key.encode())) % (2**63 - 1)


def _raw_importance(units: PrunableGroup, importance: str, seed: int, event: int) -> torch.Tensor | None:
    if importance == "random":
        g = torch.Generator().manual_seed(_seed_for(seed, event, units.key))
        return torch.rand(units.width, generator=g)
    scorer: Any
    if importance == "l1":
        scorer = tp.importance.GroupMagnitudeImportance(p=1)
    elif importance == "l2":
        scorer = tp.importance.GroupMagnitudeImportance(p=2)
    elif importance == "bn_scale":
        scorer = tp.importance.BNScaleImportance()
    else:
        scorer = tp.importance.GroupTaylorImportance()
    imp = scorer(units.group)
    return None if imp is None else imp.detach().float().cpu()


def _keep_count(n0: int, amount: float, cap: float, multiple: int) -> int:
    """Units to keep out of ``n0`` original ones for ``amount``, capped by ``cap`` and rounded to ``multiple``."""
    removed = min(math.floor(amount * n0 + _EPS), math.floor(cap * n0 + _EPS))
    if removed <= 0:
        return n0
    keep = max(1, n0 - removed)
    if multiple > 1 and n0 >= multiple:
        keep = min(n0, max(multiple, math.floor(keep / multiple + 0.5) * multiple))
    return keep


def plan_structured_pruning(
    graph: PruningGraph,
    amount: float,
    *,
    scope: str = "layer",
    importance: str = "l2",
    max_layer_amount: float = 0.9,
    round_to: int | None = None,
    original: Mapping[str, int] | None = None,
    grads: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    event: int = 0,
    amounts: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Decide which units to remove so the model reaches ``amount`` of its original size.

    Args:
        graph: from :func:`build_pruning_graph`.
        amount: fraction of units removed, relative to ``original``, e.g. ``0.5``. Units already removed
            count; a plan never adds units back.
        scope: ``"layer"`` (each group loses ``amount``) or ``"global"`` (``amount`` of all channel units,
            and separately of all heads, ranked together by group-normalized importance).
        importance: one of :data:`IMPORTANCES`, e.g. ``"l2"``. ``taylor`` uses ``grads``; ``bn_scale`` falls
            back to ``l2`` for groups without BatchNorm (with a :class:`StructuredPruningWarning`).
        max_layer_amount: no group loses more than this fraction of its original units, e.g. ``0.9``.
        round_to: kept channel counts are multiples of this, e.g. ``8`` (heads are not rounded).
        original: ``{group key: units}`` of the unpruned model (:meth:`PruningGraph.unit_counts`); default: now.
        grads: ``{parameter name: gradient}`` for ``taylor``, e.g. summed over recent steps.
        seed: seed of ``random`` importance (with ``event``: the same on every rank and after a resume).
        event: index of this pruning event, mixed into the ``random`` seed.
        amounts: per-group targets ``{group key: amount}`` (keys of :meth:`PruningGraph.unit_counts`); groups not
            named keep ``amount``. Given, every group is planned on its own (``scope`` is not used), e.g. from
            :func:`lightning_accel.recommend_allocation`.

    Returns:
        A plan: ``{"amount": float, "steps": [{"key", "root", "is_out", "idxs", "attention", "heads",
        "units"}]}`` of plain Python values (picklable, broadcastable).
    """
    check_choice("scope", scope, SCOPES)
    check_choice("importance", importance, IMPORTANCES)
    original = dict(original or {})
    counts = {g.key: original.get(g.key, g.units) for g in graph.groups}
    scores: dict[str, torch.Tensor] = {}
    fallback: list[str] = []
    with _grads_swapped(graph.model, grads) if importance == "taylor" else contextlib.nullcontext():
        for g in graph.groups:
            imp = _raw_importance(g, importance, seed, event)
            if imp is None or not torch.isfinite(imp).all() or imp.numel() != g.width:
                fallback.append(g.key)
                imp = _raw_importance(g, "l2", seed, event)
            if imp is None:
                continue
            scores[g.key] = g.unit_importance(imp)
    if fallback and importance in ("bn_scale", "taylor"):
        warnings.warn(
            f"`importance`={importance!r} gave no usable score for {len(fallback)} of {len(graph.groups)} groups "
            f"({', '.join(fallback[:4])}{', ...' if len(fallback) > 4 else ''}); used 'l2' for them"
            + (" (no BatchNorm in the group)" if importance == "bn_scale" else " (no gradient yet)"),
            StructuredPruningWarning,
            stacklevel=2,
        )
    remove: dict[str, list[int]] = {}
    groups = [g for g in graph.groups if g.key in scores]
    if amounts is not None:
        unknown = sorted(set(amounts) - set(counts) - set(original))  # a group of the unpruned model may have left
        if unknown:
            raise ValueError(
                f"`layer_amounts` names {unknown[:5]}, which are not prunable groups of {type(graph.model).__name__}; "
                f"groups: {sorted(counts)[:40]}"
            )
    if scope == "layer" or amounts is not None:
        for g in groups:
            a = amount if amounts is None else float(amounts.get(g.key, amount))
            keep = _keep_count(counts[g.key], a, max_layer_amount, _multiple(g, round_to))
            n = g.units - keep
            if n > 0:
                remove[g.key] = _lowest(scores[g.key], n)
    else:
        for pool in ([g for g in groups if g.kind != "heads"], [g for g in groups if g.kind == "heads"]):
            remove.update(_plan_global(pool, scores, counts, amount, max_layer_amount, round_to))
    steps = []
    for g in graph.groups:
        ids = remove.get(g.key)
        if not ids:
            continue
        steps.append(
            {
                "key": g.key,
                "root": g.root_name,
                "is_out": g.is_out,
                "idxs": g.indices(ids),
                "attention": g.attention,
                "attentions": list(g.attentions),
                "heads": (g.blocks - len(ids)) if g.kind == "heads" else None,
                "units": g.units - len(ids),
            }
        )
    return {"amount": float(amount), "steps": steps}


def _multiple(g: PrunableGroup, round_to: int | None) -> int:
    """What a group's kept unit count is rounded to: ``round_to`` for channels; heads and head dimensions are not."""
    return abs(round_to or 1) if g.kind == "channels" else 1


def _lowest(scores: torch.Tensor, n: int) -> list[int]:
    order = torch.sort(scores, stable=True).indices
    return sorted(order[:n].tolist())


def _plan_global(
    pool: list[PrunableGroup],
    scores: Mapping[str, torch.Tensor],
    counts: Mapping[str, int],
    amount: float,
    cap: float,
    round_to: int | None,
) -> dict[str, list[int]]:
    if not pool:
        return {}
    total0 = sum(counts[g.key] for g in pool)
    target_keep = total0 - math.floor(amount * total0 + _EPS)
    to_remove = sum(g.units for g in pool) - target_keep
    if to_remove <= 0:
        return {}
    removable = {}
    for g in pool:
        n0 = counts[g.key]
        min_keep = max(1, n0 - math.floor(cap * n0 + _EPS))
        removable[g.key] = max(0, g.units - min_keep)
    candidates = []
    for gi, g in enumerate(pool):
        for u, s in enumerate(scores[g.key].tolist()):
            candidates.append((s, gi, u))
    candidates.sort()
    chosen: dict[str, int] = {}
    for _, gi, _u in candidates:
        if to_remove <= 0:
            break
        key = pool[gi].key
        if chosen.get(key, 0) < removable[key]:
            chosen[key] = chosen.get(key, 0) + 1
            to_remove -= 1
    out = {}
    for g in pool:
        n = chosen.get(g.key, 0)
        mult = _multiple(g, round_to)
        if n and mult > 1 and g.units >= mult:
            keep = g.units - n
            keep = min(g.units, max(mult, math.floor(keep / mult + 0.5) * mult))
            n = g.units - keep
        if n > 0:
            out[g.key] = _lowest(scores[g.key], n)
    return out
