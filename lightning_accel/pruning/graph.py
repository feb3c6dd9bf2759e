"""The prunable groups of a model: :func:`build_pruning_graph` traces it once with torch-pruning's dependency
graph, which finds the layers that must shrink together (residual adds, BatchNorm, concatenations, fused ``qkv``
projections), and lists each group's removable units (:class:`PrunableGroup`: channels, heads or head dimensions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops as tp_ops

from lightning_accel._select import output_layer_name
from lightning_accel.errors import StructuredPruningError
from lightning_accel.pruning.attention import check_attention_layouts, find_attention, head_count
from lightning_accel.pruning.tracing import (
    ROOT_TYPES,
    call_model,
    describe_failure,
    module_stack,
    prepare_inputs,
    resolve_exclude,
    run_eagerly,
    tensor_shapes,
    unwrapped_parameters,
)

__all__ = ["PrunableGroup", "PruningGraph", "build_pruning_graph"]


@dataclass
class PrunableGroup:
    """One prunable group: which channel indices of ``root`` make up each removable unit."""

    key: str  # stable name: first out-pruned module of the group (registration order) or the attention module
    root_name: str
    root: nn.Module
    is_out: bool
    kind: str  # "channels" | "interleaved" (channel groups, head dims) | "heads"
    blocks: int  # interleaved: number of channel groups; heads: number of heads; channels: 1
    width: int  # channels of ``root`` along the pruned axis
    attentions: tuple[str, ...] = ()  # every attention module whose heads this group changes
    group: Any = None  # the torch-pruning Group over all channels (for importance)

    @property
    def attention(self) -> str | None:
        """The attention module whose head count the group's units follow (the first of :attr:`attentions`)."""
        return self.attentions[0] if self.attentions else None

    @property
    def units(self) -> int:
        if self.kind == "channels":
            return self.width
        if self.kind == "heads":
            return self.blocks
        return self.width // self.blocks

    def indices(self, unit_ids: Sequence[int]) -> list[int]:
        if self.kind == "channels":
            return sorted(int(u) for u in unit_ids)
        size = self.width // self.blocks
        if self.kind == "heads":
            return sorted(int(h) * size + j for h in unit_ids for j in range(size))
        return sorted(k * size + int(u) for k in range(self.blocks) for u in unit_ids)

    def unit_importance(self, imp: torch.Tensor) -> torch.Tensor:
        if self.kind == "channels":
            return imp
        if self.kind == "heads":
            return imp.view(self.blocks, -1).mean(1)
        return imp.view(self.blocks, -1).mean(0)


@dataclass
class PruningGraph:
    """A traced model and its prunable groups (see :func:`build_pruning_graph`). Valid until the model is pruned
    by something else; :func:`apply_pruning_plan_` keeps it valid across its own changes."""

    model: nn.Module
    dg: Any  # torch_pruning.DependencyGraph
    groups: list[PrunableGroup]
    attention: dict[str, tuple[nn.Module, list[nn.Module]]]
    names: dict[nn.Module, str]
    example_inputs: Any
    output_shapes: list[tuple[int, ...]]
    exclude: tuple[str, ...] = ()

    def unit_counts(self) -> dict[str, int]:
        """``{group key: number of removable units}`` (channels, heads or head dimensions) of every group."""
        return {g.key: g.units for g in self.groups}

    def group(self, key: str) -> PrunableGroup:
        for g in self.groups:
            if g.key == key:
                return g
        raise KeyError(key)


def build_pruning_graph(
    model: nn.Module,
    example_inputs: Any,
    *,
    exclude: Sequence[str] | None = None,
    prune_heads: bool = True,
) -> PruningGraph:
    """Trace ``model`` with torch-pruning and list its prunable groups.

    Args:
        model: the model; traced in eval mode (its train/eval flags are restored), eagerly even if compiled.
        example_inputs: one forward's input: a tensor, a tuple (positional) or a dict (keyword), e.g.
            ``torch.zeros(1, 1, 8, 8)``.
        exclude: glob patterns on qualified module (or parameter / class) names whose output channels are
            kept, with all their submodules, e.g. ``["blocks.0.attn"]``. The output layer is always kept.
        prune_heads: for attention modules (``nn.MultiheadAttention``, or an int head count with ``qkv`` or
            ``q``/``k``/``v`` Linears, see :func:`unknown_attention`): remove whole heads, their head count
            updated (``True``), or the same head dimensions of every head, the head count kept and the head
            size updated (``False``).

    Returns:
        The :class:`PruningGraph`.

    Raises:
        NoMatchError: an ``exclude`` pattern matches nothing.
        StructuredPruningError: the model cannot run or be traced on ``example_inputs``, or holds an attention
            module of a layout this module does not know (:func:`unknown_attention`); names the module.
    """
    check_attention_layouts(model, exclude)
    excluded_modules, excluded_params = resolve_exclude(model, exclude)
    names = {m: n for n, m in model.named_modules()}
    head = output_layer_name(model)
    if head is not None:
        excluded_modules.update(model.get_submodule(head).modules())
    attention = find_attention(model)
    qkv_owner = {id(layer): name for name, (_, layers) in attention.items() for layer in layers}
    inputs = prepare_inputs(model, example_inputs)
    output_shapes: list[tuple[int, ...]] = []
    hook = model.register_forward_hook(lambda m, i, o: output_shapes.extend(tensor_shapes(o)))
    try:
        with run_eagerly(model, grad=True), module_stack(model, names) as stack:
            dg = tp.DependencyGraph().build_dependency(
                model,
                example_inputs=inputs,
                forward_fn=call_model,  # torch-pruning would first try model(*tensor), unpacking the batch
                unwrapped_parameters=unwrapped_parameters(model),
                verbose=False,
            )
    except Exception as err:
        raise StructuredPruningError(
            f"torch-pruning could not trace {type(model).__name__}: {describe_failure(model, stack)} raised "
            f"{type(err).__name__}: {err}. Check the example input (`example_input_array` or the first batch); "
            f"if the module cannot be traced, keep it out with `exclude=[{(stack[-1] if stack and stack[-1] else '...')!r}]`."
        ) from err
    finally:
        hook.remove()

    groups: list[PrunableGroup] = []
    order = {m: i for i, m in enumerate(model.modules())}
    ignored = [m for m in excluded_modules if m in dg.module2node]
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=ROOT_TYPES):
        if not _group_allowed(dg, group, excluded_modules, excluded_params):
            continue
        units = _make_units(dg, group, names, order, attention, qkv_owner, prune_heads)
        if units is not None and units.units > 1:
            groups.append(units)
    groups.sort(key=lambda u: order.get(model.get_submodule(u.key), 0))
    return PruningGraph(model, dg, groups, attention, names, inputs, output_shapes, tuple(exclude or ()))


def _group_allowed(dg: Any, group: Any, excluded_modules: set[nn.Module], excluded_params: set[int]) -> bool:
    for dep, _ in group:
        target = dep.target
        if target.type == tp_ops.OPTYPE.OUTPUT:
            return False  # these channels are the model's output
        if target.type == tp_ops.OPTYPE.PARAMETER and id(target.module) in excluded_params:
            return False
        if dg.is_out_channel_pruning_fn(dep.handler) and target.module in excluded_modules:
            return False
    return True


def _make_units(
    dg: Any,
    group: Any,
    names: Mapping[nn.Module, str],
    order: Mapping[nn.Module, int],
    attention: Mapping[str, tuple[nn.Module, list[nn.Module]]],
    qkv_owner: Mapping[int, str],
    prune_heads: bool,
) -> PrunableGroup | None:
    out_modules = [
        dep.target.module
        for dep, _ in group
        if dg.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, nn.Module) and dep.target.module in names
    ]
    if not out_modules:
        return None
    key = names[min(out_modules, key=lambda m: order.get(m, 1 << 30))]
    owners = {qkv_owner[id(m)] for m in out_modules if id(m) in qkv_owner}
    if owners:
        if len(owners) != 1:
            return None
        attn_name = owners.pop()
        attn, qkv = attention[attn_name]
        projs = [
            dep.target.module
            for dep, _ in group
            if dg.is_in_channel_pruning_fn(dep.handler)
            and isinstance(dep.target.module, nn.Linear)
            and all(dep.target.module is not q for q in qkv)
        ]
        if len(projs) != 1 or projs[0] not in names or any(q not in out_modules for q in qkv):
            return None  # the projections must shrink together, or the heads would disagree
        proj: nn.Linear = projs[0]
        heads = head_count(attn)
        if proj.in_features % heads:
            return None
        return _head_units(dg, attn_name, names, proj, False, proj.in_features, heads, (attn_name,), prune_heads)
    mhas = [dep.target.module for dep, _ in group if isinstance(dep.target.module, nn.MultiheadAttention)]
    mhas = list({id(m): m for m in mhas if m in names}.values())
    if mhas and mhas[0].num_heads > 1:
        return _mha_units(dg, mhas, names, prune_heads)
    root = group[0].dep.target.module
    width = dg.get_out_channels(root)
    if width is None or root not in names:
        return None
    ch_groups = 1
    for dep, _ in group:
        m = dep.target.module
        if not isinstance(m, nn.Module) or m not in names:
            continue
        if isinstance(m, nn.MultiheadAttention):
            continue
        if isinstance(m, tp_ops.TORCH_CONV) and m.groups == m.out_channels:
            continue  # depthwise convs shrink with their input
        pruner = dg.get_pruner_of_module(m)
        if pruner is None:
            continue
        g = pruner.get_out_channel_groups(m) if dg.is_out_channel_pruning_fn(dep.handler) else pruner.get_in_channel_groups(m)
        ch_groups = math.lcm(ch_groups, int(g or 1))
    if width % ch_groups:
        return None
    return PrunableGroup(
        key=key,
        root_name=names[root],
        root=root,
        is_out=True,
        kind="interleaved" if ch_groups > 1 else "channels",
        blocks=ch_groups,
        width=width,
        group=group,
    )


def _mha_units(dg: Any, mhas: list[nn.MultiheadAttention], names: Mapping[nn.Module, str], prune_heads: bool) -> PrunableGroup | None:
    """``nn.MultiheadAttention`` shares its width with its input (a residual stream): the group loses whole heads or
    the same head dimensions of every head, counted on the first attention's ``embed_dim``."""
    heads = mhas[0].num_heads
    if any(m.num_heads != heads or m.embed_dim != mhas[0].embed_dim for m in mhas) or mhas[0].embed_dim % heads:
        return None  # attentions of different head counts on one channel space: no consistent unit
    root = mhas[0]
    return _head_units(dg, names[root], names, root, True, root.embed_dim, heads, tuple(names[m] for m in mhas), prune_heads)


def _head_units(
    dg: Any,
    key: str,
    names: Mapping[nn.Module, str],
    root: nn.Module,
    is_out: bool,
    width: int,
    heads: int,
    attentions: tuple[str, ...],
    prune_heads: bool,
) -> PrunableGroup:
    """The group of an attention's heads, rooted at ``root``'s output (``is_out``) or input channels (``width`` of
    them): whole heads (``prune_heads``) or the same head dimensions of every head; the torch-pruning group spans
    all ``width`` channels, for importance."""
    pruner = dg.get_pruner_of_module(root)
    fn = pruner.prune_out_channels if is_out else pruner.prune_in_channels
    return PrunableGroup(
        key=key,
        root_name=names[root],
        root=root,
        is_out=is_out,
        kind="heads" if prune_heads else "interleaved",
        blocks=heads,
        width=width,
        attentions=attentions,
        group=dg.get_pruning_group(root, fn, list(range(width))),
    )
