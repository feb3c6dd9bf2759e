"""Applying a plan and rolling it back: :func:`apply_pruning_plan_` removes the planned units in place, checks that
the model still runs (restoring it and naming the failing module otherwise) and returns the recorded history plus,
for every replaced parameter, the kept indices (:class:`ParamSlice`). :func:`snapshot_structure` and
:func:`restore_structure` put a model back exactly as it was, for callers that prune only to measure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch_pruning import ops as tp_ops

from lightning_accel._compat import module_slots, param_name, restore_module_slots, wrap_prune_parameter
from lightning_accel.errors import StructuredPruningError
from lightning_accel.pruning.attention import head_count, set_heads, sync_configs_
from lightning_accel.pruning.graph import PrunableGroup, PruningGraph, build_pruning_graph
from lightning_accel.pruning.tracing import (
    call_model,
    describe_failure,
    module_stack,
    run_eagerly,
    tensor_shapes,
)
from lightning_accel.pruning.widths import sync_widths_

__all__ = [
    "ParamSlice",
    "PruningResult",
    "StructureSnapshot",
    "apply_pruning_plan_",
    "restore_structure",
    "snapshot_structure",
]


#: What :func:`snapshot_structure` records: for every module (and ``config`` object), its attributes, parameters,
#: buffers and children.
StructureSnapshot = list[tuple[Any, dict[str, Any], "dict[str, dict[str, Any]] | None"]]


@dataclass
class ParamSlice:
    """A parameter replaced by pruning: ``new`` is ``old`` indexed by ``ops`` (``(dim, kept indices)``, in
    order). ``ops is None`` means the change is unknown (state cannot be sliced)."""

    name: str
    old: nn.Parameter
    new: nn.Parameter
    ops: list[tuple[int, torch.Tensor]] | None


@dataclass
class PruningResult:
    """What one pruning event did.

    Attributes:
        ops: the expanded history: ``[name, "out" | "in" | "param", idxs, dim]`` for every layer or raw
            parameter changed, in order; :func:`replay_pruning_` re-applies it.
        heads: ``{attention module: new num_heads}``.
        slices: one :class:`ParamSlice` per replaced parameter (for :func:`slice_optimizer_`).
        removed: ``{group key: units removed now}``.
        units: ``{group key: units left}`` for the groups changed.
    """

    ops: list[list[Any]] = field(default_factory=list)
    heads: dict[str, int] = field(default_factory=dict)
    slices: list[ParamSlice] = field(default_factory=list)
    removed: dict[str, int] = field(default_factory=dict)
    units: dict[str, int] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The replayable part, as plain data: ``{"ops": ..., "heads": ...}``."""
        return {"ops": [list(op) for op in self.ops], "heads": dict(self.heads)}


@contextlib.contextmanager
def _track_param_slices() -> Iterator[dict[int, tuple[nn.Parameter, nn.Parameter, list[tuple[int, torch.Tensor]]]]]:
    """Record, for every parameter torch-pruning replaces, the kept indices along each pruned dimension.

    Every torch-pruning layer pruner cuts parameters through one internal (:func:`_compat.wrap_prune_parameter`);
    wrapping it for the duration of one event gives the exact index map, chained when a parameter is cut twice
    (a Linear's rows, then its columns).
    """
    record: dict[int, tuple[nn.Parameter, nn.Parameter, list[tuple[int, torch.Tensor]]]] = {}

    def tracked(original: Any, pruner: Any, weight: nn.Parameter, keep_idxs: Any, pruning_dim: int) -> nn.Parameter:
        new = original(pruner, weight, keep_idxs, pruning_dim)
        keep = torch.as_tensor(keep_idxs, dtype=torch.long).reshape(-1).cpu()
        first, _, ops = record.pop(id(weight), (weight, weight, []))
        record[id(new)] = (first, new, [*ops, (pruning_dim, keep)])
        return new

    with wrap_prune_parameter(tracked):
        yield record


def snapshot_structure(model: nn.Module) -> StructureSnapshot:
    """What :func:`restore_structure` needs to put ``model`` back exactly as it is now, pruned or not: shallow
    copies of every module's attributes, parameters, buffers and children (and of Hugging Face style ``config``
    objects). Pruning replaces tensors and ints, never mutates them, so shallow copies suffice and cost no memory
    for the weights.

    Example::

        snapshot = snapshot_structure(model)
        try:
            apply_pruning_plan_(graph, plan)
            ...                                   # measure the pruned model
        finally:
            restore_structure(snapshot)           # every shape, head count and config as before
    """
    snap: StructureSnapshot = [(m, dict(m.__dict__), module_slots(m)) for m in model.modules()]
    configs = {id(c): c for m in model.modules() if (c := m.__dict__.get("config")) is not None and hasattr(c, "__dict__")}
    snap.extend((c, dict(c.__dict__), None) for c in configs.values())
    return snap


def restore_structure(snapshot: StructureSnapshot) -> None:
    """Put every module (and ``config``) recorded by :func:`snapshot_structure` back as it was, in place."""
    for m, attrs, slots in snapshot:
        m.__dict__.clear()
        m.__dict__.update(attrs)
        if slots is not None:
            restore_module_slots(m, slots)


def _expand(dg: Any, group: Any, names: Mapping[nn.Module, str]) -> list[list[Any]]:
    ops = []
    for dep, idxs in group:
        target = dep.target
        plain = sorted(int(i) for i in idxs)
        if target.type == tp_ops.OPTYPE.PARAMETER:
            ops.append([param_name(dg, target.module), "param", plain, int(target.pruning_dim)])
        elif isinstance(target.module, nn.Module) and target.module in names:
            kind = "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in"
            ops.append([names[target.module], kind, plain, int(target.pruning_dim)])
    return ops


def _apply_steps(graph: PruningGraph, steps: Sequence[Mapping[str, Any]]) -> PruningResult:
    dg, model = graph.dg, graph.model
    result = PruningResult()
    before = dict(model.named_parameters())
    with _track_param_slices() as tracked:
        for step in steps:
            module = model.get_submodule(step["root"])
            pruner = dg.get_pruner_of_module(module)
            fn = pruner.prune_out_channels if step["is_out"] else pruner.prune_in_channels
            group = dg.get_pruning_group(module, fn, list(step["idxs"]))
            if not dg.check_pruning_group(group):
                raise StructuredPruningError(f"the plan would remove every channel of {step['root']!r}")
            result.ops.extend(_expand(dg, group, graph.names))
            group.prune()
            attentions = step.get("attentions") or ([step["attention"]] if step.get("attention") is not None else [])
            for name in attentions:
                heads = int(step["heads"]) if step.get("heads") is not None else head_count(model.get_submodule(name))
                set_heads(model, name, heads)
                result.heads[name] = heads
            result.units[step["key"]] = int(step["units"])
    sync_configs_(model)
    sync_widths_(model)
    after = dict(model.named_parameters())
    by_new = {id(new): (old, new, ops) for old, new, ops in tracked.values()}
    for name, p in after.items():
        old = before.get(name)
        if old is None or old is p:
            continue
        entry = by_new.get(id(p))
        if entry is not None and entry[0] is old:
            result.slices.append(ParamSlice(name, old, p, entry[2]))
        else:
            result.slices.append(ParamSlice(name, old, p, None))
    return result


def _verify(graph: PruningGraph) -> None:
    model = graph.model
    with run_eagerly(model, grad=False), module_stack(model, graph.names) as stack:
        model.eval()
        try:
            out = call_model(model, graph.example_inputs)
        except Exception as err:
            raise StructuredPruningError(f"{describe_failure(model, stack)} raised {type(err).__name__}: {err}") from err
    shapes = tensor_shapes(out)
    if shapes != graph.output_shapes:
        raise StructuredPruningError(f"the output shapes changed from {graph.output_shapes} to {shapes}")


def apply_pruning_plan_(graph: PruningGraph, plan: Mapping[str, Any], *, verify: bool = True) -> PruningResult:
    """Remove the planned units from ``graph.model`` in place.

    Args:
        graph: from :func:`build_pruning_graph` on the model as it is now.
        plan: from :func:`plan_structured_pruning` (possibly computed on another rank of the same model).
        verify: run the example input through the pruned model and compare output shapes.

    Returns:
        The :class:`PruningResult`.

    Raises:
        StructuredPruningError: the pruned model does not run; the model is restored and the message names
            the failing module and the groups to ``exclude``.
    """
    if not plan["steps"]:
        return PruningResult()
    snapshot = snapshot_structure(graph.model)
    try:
        result = _apply_steps(graph, plan["steps"])
        if verify:
            _verify(graph)
    except StructuredPruningError as err:
        restore_structure(snapshot)
        culprits = _bisect(graph, plan["steps"]) if verify else []
        keys = culprits or [s["key"] for s in plan["steps"]]
        raise StructuredPruningError(
            f"{type(graph.model).__name__} does not run after structured pruning: {err}. "
            f"The model was left unpruned. Keep the channels of the groups rooted at {keys} with "
            f"`exclude={keys!r}` (or exclude the failing module and the layers that feed it)."
        ) from err
    except BaseException:
        restore_structure(snapshot)
        raise
    for s in plan["steps"]:
        g = graph.group(s["key"])
        result.removed[s["key"]] = g.units - int(s["units"])
        _refresh(graph, g)
    return result


def _refresh(graph: PruningGraph, g: PrunableGroup) -> None:
    """Update a group's sizes after its channels were removed (the torch-pruning graph stays valid)."""
    if g.is_out:
        g.width = graph.dg.get_out_channels(g.root)
    else:
        g.width = graph.dg.get_in_channels(g.root)
    if g.kind == "heads" and g.attention is not None:
        g.blocks = head_count(graph.model.get_submodule(g.attention))


def _bisect(graph: PruningGraph, steps: Sequence[Mapping[str, Any]]) -> list[str]:
    """The group keys whose removal alone breaks the model (each tried on a fresh graph, then undone)."""
    bad = []
    for step in steps:
        snapshot = snapshot_structure(graph.model)
        try:
            probe = build_pruning_graph(graph.model, graph.example_inputs, exclude=graph.exclude)
            _apply_steps(probe, [step])
            _verify(probe)
        except Exception:
            bad.append(step["key"])
        finally:
            restore_structure(snapshot)
    return bad
