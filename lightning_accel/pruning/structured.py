"""Structured pruning: remove whole channels, neurons and attention heads with torch-pruning.

Zeroed weights make a model compressible, not faster; removing whole channels makes every layer
physically smaller. This module is the framework-free core (no Trainer), built on torch-pruning's
dependency graph, which finds the layers that must shrink together (residual adds, BatchNorm,
concatenations, fused ``qkv`` projections):

* :func:`build_pruning_graph` traces a model once and lists its *prunable groups*: channels of conv/linear
  groups, and attention heads (or head dimensions) of ``nn.MultiheadAttention`` and of modules that carry a
  head count (``num_heads``, Hugging Face ``num_attention_heads``, ...) and a fused ``qkv`` Linear (or
  ``q``/``k``/``v``, ``query``/``key``/``value``, ``q_proj``... Linears); their head attributes and a Hugging Face
  ``config.num_attention_heads`` follow. Attention of any other layout is refused (:func:`check_attention_layouts`).
* :func:`plan_structured_pruning` ranks units by importance (``l1``, ``l2``, ``taylor``, ``bn_scale``, ``random``)
  and decides which to remove so each group (``scope="layer"``) or the whole model (``scope="global"``)
  reaches ``amount`` of its *original* size. The plan is plain data, so under DDP one rank can decide and
  broadcast it.
* :func:`apply_pruning_plan_` removes the planned units in place, checks that the model still runs (rolling
  back and naming the failing module otherwise) and returns the recorded history plus, for every
  replaced parameter, the kept indices (:class:`ParamSlice`).
* :func:`slice_optimizer_` re-binds optimizer parameters in place and slices their state (momentum,
  Adam moments) to the kept indices.
* :func:`replay_pruning_` re-applies a recorded history to a freshly built model before its weights load;
  it needs no example input and leaves the model untouched when the history does not fit.
* :func:`prune_structured_` does all of it in one call; :func:`count_macs_params` measures the result.

    graph = build_pruning_graph(model, torch.zeros(1, 1, 8, 8))
    result = prune_structured_(model, torch.zeros(1, 1, 8, 8), amount=0.5, optimizers=[opt])
    replay_pruning_(fresh_model, [result.record()])        # same shapes, ready for load_state_dict
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import torch
import torch_pruning as tp
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torch_pruning import ops as tp_ops
from torch_pruning.pruner.function import ParameterPruner

from lightning_accel._compat import param_name, wrap_prune_parameter
from lightning_accel._select import (
    NoMatchError,
    describe_candidates,
    matches,
    name_matches,
    output_layer_name,
)
from lightning_accel._validate import check_choice
from lightning_accel.errors import StructuredPruningError, StructuredPruningWarning  # noqa: F401 (public here too)

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

#: Importance criteria: group L1/L2 magnitude, first-order Taylor (|w * grad|), BatchNorm scale, seeded random.
IMPORTANCES: tuple[str, ...] = ("l1", "l2", "taylor", "bn_scale", "random")
#: ``layer``: every group loses ``amount`` of its units; ``global``: ``amount`` of all units, ranked together.
SCOPES: tuple[str, ...] = ("layer", "global")

_ROOT_TYPES = (tp_ops.TORCH_CONV, tp_ops.TORCH_LINEAR, tp_ops.TORCH_LSTM)
_QKV_NAMES = (("qkv",), ("q", "k", "v"), ("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q_lin", "k_lin", "v_lin"))
_EPS = 1e-9


# ----------------------------------------------------------------------------------------------------------
# graph


@dataclass
class _Units:
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
    groups: list[_Units]
    attention: dict[str, tuple[nn.Module, list[nn.Module]]]
    names: dict[nn.Module, str]
    example_inputs: Any
    output_shapes: list[tuple[int, ...]]
    exclude: tuple[str, ...] = ()

    def unit_counts(self) -> dict[str, int]:
        """``{group key: number of removable units}`` (channels, heads or head dimensions) of every group."""
        return {g.key: g.units for g in self.groups}

    def group(self, key: str) -> _Units:
        for g in self.groups:
            if g.key == key:
                return g
        raise KeyError(key)


#: Attribute names of an attention module's head count, head size and total width (heads x head size), in the
#: spellings of timm (``num_heads``, ``head_dim``, ``attn_dim``), Hugging Face BERT/RoBERTa (``num_attention_heads``,
#: ``attention_head_size``, ``all_head_size``), Hugging Face ViT (``num_attention_heads``, ``head_dim``), DistilBERT
#: (``n_heads``), T5 (``n_heads``, ``key_value_proj_dim``, ``inner_dim``) and nanoGPT-style code (``n_head``).
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim")
_ALL_HEADS_ATTRS = ("attn_dim", "all_head_size", "inner_dim")
#: Head counts that make a module look like attention when its layout is not one of the known ones.
_LOOKS_LIKE_HEADS = (*_HEAD_ATTRS, "heads", "nhead", "num_kv_heads", "num_key_value_heads")
#: Grouped-query attention: fewer key/value heads than query heads (not supported: refused).
_KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")


def _heads_attr(m: nn.Module) -> str | None:
    """The name of ``m``'s head-count attribute (an int >= 1), or ``None``."""
    for name in _HEAD_ATTRS:
        value = m.__dict__.get(name)
        if _is_count(value) and value >= 1:
            return name
    return None


def _layout_problem(m: nn.Module) -> str | None:
    """Why ``m`` (a module with a head count) is not an attention layout this module can prune; ``None`` if it is."""
    attr = _heads_attr(m)
    if attr is None:
        return "no int `num_heads` / `num_attention_heads` / `n_heads` attribute"
    heads = int(getattr(m, attr))
    layers = _qkv_layers(m)
    if not layers:
        names = " / ".join("+".join(n) for n in _QKV_NAMES)
        return f"no query/key/value Linear layers under the known names ({names})"
    for kv in _KV_HEAD_ATTRS:
        value = m.__dict__.get(kv)
        if isinstance(value, int) and value != heads:
            return f"grouped-query attention (`{kv}`={value} != `{attr}`={heads})"
    widths = {layer.out_features for layer in layers}
    if len(widths) != 1:
        return f"query/key/value widths differ ({sorted(widths)})"
    width = _qkv_width(layers)
    if len(layers) == 1 and layers[0].out_features % 3:
        return f"fused `qkv` width {layers[0].out_features} is not a multiple of 3"
    if width % heads:
        return f"projection width {width} is not a multiple of `{attr}`={heads}"
    for name in _HEAD_DIM_ATTRS:
        value = m.__dict__.get(name)
        if isinstance(value, int) and value * heads != width:
            return f"`{name}`={value} x `{attr}`={heads} != projection width {width}"
    return None


def _find_attention(model: nn.Module) -> dict[str, tuple[nn.Module, list[nn.Module]]]:
    """Attention modules of a known layout: an int head count (:data:`_HEAD_ATTRS`) and a fused ``qkv`` Linear
    (or separate query/key/value Linears, :data:`_QKV_NAMES`) of matching widths."""
    found: dict[str, tuple[nn.Module, list[nn.Module]]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention) or _heads_attr(m) is None:
            continue
        if _layout_problem(m) is None:
            found[name] = (m, list(_qkv_layers(m)))
    return found


def unknown_attention(model: nn.Module, exclude: Sequence[str] | None = None) -> dict[str, str]:
    """Modules that look like multi-head attention (a head count above one and Linear layers of their own) but
    whose layout structured pruning does not know, ``{name: reason}``; modules matched by ``exclude`` (or inside
    one) are left out. Pruning their channels would mix heads, so they are refused before any pruning.

    Known layouts: ``nn.MultiheadAttention``; a module with an int ``num_heads`` / ``num_attention_heads`` /
    ``n_heads`` / ``n_head``, a fused ``qkv`` Linear or ``q``/``k``/``v`` (``q_proj``..., ``query``..., ``q_lin``...)
    Linears of equal width, and, if it keeps them, a head size (``head_dim``, ``attention_head_size``,
    ``head_size``) and total width (``attn_dim``, ``all_head_size``) that agree with those widths.
    """
    excluded, _ = _excluded(model, exclude)
    known = {id(m) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    known.update(id(m) for _, (m, _) in _find_attention(model).items())
    problems: dict[str, str] = {}
    for name, m in model.named_modules():
        if id(m) in known or m in excluded:
            continue
        if not any(_is_count(m.__dict__.get(a)) and m.__dict__[a] > 1 for a in _LOOKS_LIKE_HEADS):
            continue
        # two or more Linear(-like: Hugging Face GPT-2's ``Conv1D``) layers of its own: projections in, out
        linear = [c for c in m.children() if isinstance(getattr(c, "weight", None), torch.Tensor) and c.weight.dim() == 2]
        if len(linear) < 2 or any(id(sub) in known for sub in m.modules()):
            continue  # a classifier or a model that only stores the hyper-parameter of the attention it contains
        problem = _layout_problem(m)
        if problem is not None:
            problems[name] = problem
    return problems


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def check_attention_layouts(model: nn.Module, exclude: Sequence[str] | None = None) -> None:
    """Raise :class:`StructuredPruningError` naming every attention module of an unknown layout (see
    :func:`unknown_attention`) and the ``exclude`` that keeps it; no tracing, so it runs before training."""
    problems = unknown_attention(model, exclude)
    if problems:
        listed = "; ".join(f"{n!r} ({type(model.get_submodule(n)).__name__}): {why}" for n, why in problems.items())
        raise StructuredPruningError(
            f"structured pruning does not know the attention layout of {listed}. Pruning its channels would mix "
            f"its heads, so nothing was pruned. Keep it whole with `exclude={list(problems)!r}`, or give it a known "
            "layout (an int `num_heads` and `qkv` or `q`/`k`/`v` Linear layers; see the README)."
        )


def _qkv_layers(attn: nn.Module) -> list[nn.Linear]:
    """The ``qkv`` Linear, or the ``q``/``k``/``v`` Linears (by their usual names), of an attention module."""
    for names in _QKV_NAMES:
        layers = [attn._modules.get(n) for n in names]
        if all(isinstance(layer, nn.Linear) for layer in layers):
            return [layer for layer in layers if isinstance(layer, nn.Linear)]
    return []


def _qkv_width(layers: Sequence[nn.Linear]) -> int:
    """The width of one of the query, key and value projections (a third of a fused ``qkv``)."""
    return layers[0].out_features // (3 if len(layers) == 1 else 1)


def _num_heads(attn: nn.Module) -> int:
    attr = "num_heads" if isinstance(attn, nn.MultiheadAttention) else _heads_attr(attn)
    if attr is None:
        raise ValueError(f"{type(attn).__name__} has no int head count ({', '.join(_HEAD_ATTRS)})")
    return int(getattr(attn, attr))


def _unwrapped_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Parameters outside modules torch-pruning knows (e.g. ``pos_embed``), pruned on their last
    non-singleton dimension (torch-pruning's own default, made explicit to keep its warning quiet)."""
    dg = tp.DependencyGraph()
    wrapped: set[int] = set()
    for m in model.modules():
        t = tp_ops.module2type(m)
        if t in dg.REGISTERED_PRUNERS and t != tp_ops.OPTYPE.ELEMENTWISE:
            wrapped.update(id(p) for p in m.parameters())
    out = []
    for _, p in model.named_parameters():
        if id(p) in wrapped:
            continue
        dims = [i for i, s in enumerate(p.shape) if s > 1]
        if dims:
            out.append((p, dims[-1]))
    return out


def _excluded(model: nn.Module, exclude: Sequence[str] | None) -> tuple[set[nn.Module], set[int]]:
    """Modules (with all their submodules) and parameter ids matched by ``exclude`` glob patterns."""
    modules: set[nn.Module] = set()
    params: set[int] = set()
    named = list(model.named_modules())
    for pattern in exclude or ():
        hit = False
        for name, m in named:
            if name and matches(name, m, [pattern]):
                hit = True
                modules.update(m.modules())
                params.update(id(p) for p in m.parameters())
        for name, p in model.named_parameters():
            if name_matches(name, [pattern]):
                hit = True
                params.add(id(p))
        if not hit:
            raise NoMatchError(
                f"`exclude` pattern {pattern!r} matches no module or parameter of {type(model).__name__}; "
                f"candidates: {describe_candidates([n for n, _ in named[1:]])}"
            )
    return modules, params


def _map_tensors(x: Any, fn: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_map_tensors(v, fn) for v in x)
    if isinstance(x, dict):
        return {k: _map_tensors(v, fn) for k, v in x.items()}
    return x


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _prepare_inputs(model: nn.Module, example_inputs: Any) -> Any:
    """Example inputs on the model's device, as ordinary (non-inference) tensors."""
    device = _device_of(model)
    with torch.inference_mode(False):
        return _map_tensors(example_inputs, lambda t: t.detach().to(device).clone())


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _shapes(out: Any) -> list[tuple[int, ...]]:
    found: list[tuple[int, ...]] = []
    _map_tensors(out, lambda t: found.append(tuple(t.shape)))
    return found


@contextlib.contextmanager
def _eager(model: nn.Module, grad: bool) -> Iterator[None]:
    """Run ``model`` eagerly (even if compiled) with autograd on or off; restore every train/eval flag."""
    modes = [(m, m.training) for m in model.modules()]
    stance = (
        torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else contextlib.nullcontext()
    )
    try:
        with stance, torch.inference_mode(False), torch.set_grad_enabled(grad):
            yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _module_stack(model: nn.Module, names: Mapping[nn.Module, str]) -> Iterator[list[str]]:
    """Track which modules are running, so an exception can name the innermost one."""
    stack: list[str] = []
    handles = []

    def pre(m: nn.Module, *_: Any) -> None:
        stack.append(names.get(m, type(m).__name__))

    def post(m: nn.Module, *_: Any) -> None:
        if stack:
            stack.pop()

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _describe_failure(model: nn.Module, stack: list[str]) -> str:
    if not stack or stack[-1] == "":
        return f"the forward of {type(model).__name__}"
    name = stack[-1]
    try:
        cls = type(model.get_submodule(name)).__name__
    except AttributeError:
        cls = "?"
    return f"module {name!r} ({cls})"


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
    excluded_modules, excluded_params = _excluded(model, exclude)
    names = {m: n for n, m in model.named_modules()}
    head = output_layer_name(model)
    if head is not None:
        excluded_modules.update(model.get_submodule(head).modules())
    attention = _find_attention(model)
    qkv_owner = {id(layer): name for name, (_, layers) in attention.items() for layer in layers}
    inputs = _prepare_inputs(model, example_inputs)
    output_shapes: list[tuple[int, ...]] = []
    hook = model.register_forward_hook(lambda m, i, o: output_shapes.extend(_shapes(o)))
    try:
        with _eager(model, grad=True), _module_stack(model, names) as stack:
            dg = tp.DependencyGraph().build_dependency(
                model,
                example_inputs=inputs,
                forward_fn=_call,  # torch-pruning would first try model(*tensor), unpacking the batch
                unwrapped_parameters=_unwrapped_parameters(model),
                verbose=False,
            )
    except Exception as err:
        raise StructuredPruningError(
            f"torch-pruning could not trace {type(model).__name__}: {_describe_failure(model, stack)} raised "
            f"{type(err).__name__}: {err}. Check the example input (`example_input_array` or the first batch); "
            f"if the module cannot be traced, keep it out with `exclude=[{(stack[-1] if stack and stack[-1] else '...')!r}]`."
        ) from err
    finally:
        hook.remove()

    groups: list[_Units] = []
    order = {m: i for i, m in enumerate(model.modules())}
    ignored = [m for m in excluded_modules if m in dg.module2node]
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=_ROOT_TYPES):
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
) -> _Units | None:
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
        heads = _num_heads(attn)
        if proj.in_features % heads:
            return None
        pruner = dg.get_pruner_of_module(proj)
        full = dg.get_pruning_group(proj, pruner.prune_in_channels, list(range(proj.in_features)))
        return _Units(
            key=attn_name,
            root_name=names[proj],
            root=proj,
            is_out=False,
            kind="heads" if prune_heads else "interleaved",
            blocks=heads,
            width=proj.in_features,
            attentions=(attn_name,),
            group=full,
        )
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
    return _Units(
        key=key,
        root_name=names[root],
        root=root,
        is_out=True,
        kind="interleaved" if ch_groups > 1 else "channels",
        blocks=ch_groups,
        width=width,
        group=group,
    )


def _mha_units(dg: Any, mhas: list[nn.MultiheadAttention], names: Mapping[nn.Module, str], prune_heads: bool) -> _Units | None:
    """``nn.MultiheadAttention`` shares its width with its input (a residual stream): the group loses whole heads or
    the same head dimensions of every head, counted on the first attention's ``embed_dim``."""
    heads = mhas[0].num_heads
    if any(m.num_heads != heads or m.embed_dim != mhas[0].embed_dim for m in mhas) or mhas[0].embed_dim % heads:
        return None  # attentions of different head counts on one channel space: no consistent unit
    root = mhas[0]
    pruner = dg.get_pruner_of_module(root)
    full = dg.get_pruning_group(root, pruner.prune_out_channels, list(range(root.embed_dim)))
    return _Units(
        key=names[root],
        root_name=names[root],
        root=root,
        is_out=True,
        kind="heads" if prune_heads else "interleaved",
        blocks=heads,
        width=root.embed_dim,
        attentions=tuple(names[m] for m in mhas),
        group=full,
    )


# ----------------------------------------------------------------------------------------------------------
# importance and plan


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


def _raw_importance(units: _Units, importance: str, seed: int, event: int) -> torch.Tensor | None:
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


def _multiple(g: _Units, round_to: int | None) -> int:
    """What a group's kept unit count is rounded to: ``round_to`` for channels; heads and head dimensions are not."""
    return abs(round_to or 1) if g.kind == "channels" else 1


def _lowest(scores: torch.Tensor, n: int) -> list[int]:
    order = torch.sort(scores, stable=True).indices
    return sorted(order[:n].tolist())


def _plan_global(
    pool: list[_Units],
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


# ----------------------------------------------------------------------------------------------------------
# applying a plan


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


def _snapshot(model: nn.Module) -> list[tuple[Any, dict[str, Any], dict, dict, dict]]:
    """Shallow copies of every module's attributes (and of Hugging Face style ``config`` objects): pruning
    replaces tensors and ints, never mutates them."""
    snap: list[tuple[Any, dict[str, Any], dict, dict, dict]] = [
        (m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in model.modules()
    ]
    configs = {id(c): c for m in model.modules() if (c := m.__dict__.get("config")) is not None and hasattr(c, "__dict__")}
    snap.extend((c, dict(c.__dict__), {}, {}, {}) for c in configs.values())
    return snap


def _restore(snapshot: list[tuple[Any, dict[str, Any], dict, dict, dict]]) -> None:
    for m, attrs, params, buffers, modules in snapshot:
        m.__dict__.clear()
        m.__dict__.update(attrs)
        if isinstance(m, nn.Module):
            m._parameters = params
            m._buffers = buffers
            m._modules = modules


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
                heads = int(step["heads"]) if step.get("heads") is not None else _num_heads(model.get_submodule(name))
                _set_heads(model, name, heads)
                result.heads[name] = heads
            result.units[step["key"]] = int(step["units"])
    sync_configs_(model)
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
    with _eager(model, grad=False), _module_stack(model, graph.names) as stack:
        model.eval()
        try:
            out = _call(model, graph.example_inputs)
        except Exception as err:
            raise StructuredPruningError(f"{_describe_failure(model, stack)} raised {type(err).__name__}: {err}") from err
    shapes = _shapes(out)
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
    snapshot = _snapshot(graph.model)
    try:
        result = _apply_steps(graph, plan["steps"])
        if verify:
            _verify(graph)
    except StructuredPruningError as err:
        _restore(snapshot)
        culprits = _bisect(graph, plan["steps"]) if verify else []
        keys = culprits or [s["key"] for s in plan["steps"]]
        raise StructuredPruningError(
            f"{type(graph.model).__name__} does not run after structured pruning: {err}. "
            f"The model was left unpruned. Keep the channels of the groups rooted at {keys} with "
            f"`exclude={keys!r}` (or exclude the failing module and the layers that feed it)."
        ) from err
    except BaseException:
        _restore(snapshot)
        raise
    for s in plan["steps"]:
        g = graph.group(s["key"])
        result.removed[s["key"]] = g.units - int(s["units"])
        _refresh(graph, g)
    return result


def _refresh(graph: PruningGraph, g: _Units) -> None:
    """Update a group's sizes after its channels were removed (the torch-pruning graph stays valid)."""
    if g.is_out:
        g.width = graph.dg.get_out_channels(g.root)
    else:
        g.width = graph.dg.get_in_channels(g.root)
    if g.kind == "heads" and g.attention is not None:
        g.blocks = _num_heads(graph.model.get_submodule(g.attention))


def _bisect(graph: PruningGraph, steps: Sequence[Mapping[str, Any]]) -> list[str]:
    """The group keys whose removal alone breaks the model (each tried on a fresh graph, then undone)."""
    bad = []
    for step in steps:
        snapshot = _snapshot(graph.model)
        try:
            probe = build_pruning_graph(graph.model, graph.example_inputs, exclude=graph.exclude)
            _apply_steps(probe, [step])
            _verify(probe)
        except Exception:
            bad.append(step["key"])
        finally:
            _restore(snapshot)
    return bad


# ----------------------------------------------------------------------------------------------------------
# optimizer


_BNB_BLOCK = 256  # bitsandbytes' block-wise 8-bit optimizer state: one absmax per 256 values of the flattened tensor


def _slice_state(state: Mapping[str, Any], s: ParamSlice) -> dict[str, Any] | None:
    """``state`` of the parameter ``s.old`` indexed like ``s.new``; ``None`` where it cannot be (its tensors are
    neither shaped like the parameter nor scalars, e.g. per-tensor 8-bit state). Block-wise 8-bit state
    (bitsandbytes' ``state1``/``absmax1``/``qmap1``) is dequantized, sliced and quantized again in new blocks."""
    if s.ops is None:
        return None
    out: dict[str, Any] = {}
    for k, v in state.items():
        if k.startswith(("absmax", "qmap")) and f"state{k[6:] if k.startswith('absmax') else k[4:]}" in state:
            continue  # written with its state tensor below
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == s.old.shape:
            n = k[len("state"):] if k.startswith("state") else None
            blockwise = v.dtype == torch.uint8 and f"absmax{n}" in state and f"qmap{n}" in state
            if v.dtype == torch.uint8 and not blockwise:
                return None
            if blockwise:
                import bitsandbytes.functional as bnbf

                code = state[f"qmap{n}"]
                v = bnbf.dequantize_blockwise(v, absmax=state[f"absmax{n}"], code=code, blocksize=_BNB_BLOCK)
            for dim, keep in s.ops:
                v = torch.index_select(v, dim, keep.to(v.device))
            v = v.contiguous()
            if blockwise:
                v, qstate = bnbf.quantize_blockwise(v, code=code, blocksize=_BNB_BLOCK)
                out[f"absmax{n}"], out[f"qmap{n}"] = qstate.absmax, code
            out[k] = v
        elif isinstance(v, torch.Tensor) and v.numel() > 1:
            return None  # state of another shape: it cannot be sliced
        else:
            out[k] = v
    return out


def slice_optimizer_(optimizer: torch.optim.Optimizer, slices: Sequence[ParamSlice], *, reset: bool = False) -> list[str]:
    """Re-bind ``optimizer`` to the pruned parameters in place and slice their state to the kept indices.

    ``param_groups[i]["params"]`` is edited in place, so LR schedulers and hyper-parameters are untouched.
    State tensors shaped like the parameter (momentum, ``exp_avg``, ``exp_avg_sq``) are indexed like the
    parameter; scalars (``step``) are kept.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (bitsandbytes' included).
        slices: :attr:`PruningResult.slices`.
        reset: drop the state of re-bound parameters instead (the optimizer restarts their statistics).

    Returns:
        Names of parameters whose state could not be sliced and was dropped (e.g. per-tensor 8-bit
        state); empty when everything was sliced.
    """
    by_old = {id(s.old): s for s in slices}
    dropped = []
    for group in optimizer.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            s = by_old.get(id(p))
            if s is None:
                continue
            params[i] = s.new
            state = optimizer.state.pop(p, None)
            if not state or reset:
                continue
            new_state = _slice_state(state, s)
            if new_state is None:
                dropped.append(s.name)
            else:
                optimizer.state[s.new] = new_state
    return dropped


# ----------------------------------------------------------------------------------------------------------
# replay


def _skeleton(m: nn.Module) -> nn.Module:
    """A copy of ``m`` whose tensors live on the meta device: pruning it costs nothing and touches nothing."""
    c = copy.copy(m)
    c._parameters = {
        k: None if p is None else nn.Parameter(torch.empty(p.shape, device="meta", dtype=p.dtype), p.requires_grad)
        for k, p in m._parameters.items()
    }
    c._buffers = {k: None if b is None else torch.empty(b.shape, device="meta", dtype=b.dtype) for k, b in m._buffers.items()}
    c._modules = {k: None if s is None else _skeleton(s) for k, s in m._modules.items()}
    return c


def _flatten(history: Sequence[Mapping[str, Any]]) -> tuple[list[list[Any]], dict[str, int]]:
    ops: list[list[Any]] = []
    heads: dict[str, int] = {}
    for event in history:
        ops.extend(event.get("ops", ()))
        heads.update(event.get("heads", {}))
    return ops, heads


def _run_ops(
    ops: Sequence[Sequence[Any]],
    get_module: Any,
    get_param: Any,
    set_param: Any,
) -> None:
    dg = tp.DependencyGraph()
    for i, op in enumerate(ops):
        if len(op) != 4:
            raise ValueError(f"op {i} is not [name, kind, idxs, dim]: {op!r}")
        name, kind, idxs, dim = op
        idxs = [int(x) for x in idxs]
        if kind == "param":
            p = get_param(name)
            pruner: Any = ParameterPruner(pruning_dim=int(dim))
            n = p.shape[int(dim)]
            _check_idxs(name, kind, idxs, n)
            set_param(name, pruner.prune_out_channels(p, idxs))
            continue
        if kind not in ("out", "in"):
            raise ValueError(f"op {i} has kind {kind!r}; expected 'out', 'in' or 'param'")
        m = get_module(name)
        pruner = dg.get_pruner_of_module(m)
        if pruner is None or tp_ops.module2type(m) == tp_ops.OPTYPE.ELEMENTWISE:
            raise ValueError(f"module {name!r} ({type(m).__name__}) has no torch-pruning pruner")
        pruner.pruning_dim = int(dim)
        n = pruner.get_out_channels(m) if kind == "out" else pruner.get_in_channels(m)
        _check_idxs(name, kind, idxs, n)
        (pruner.prune_out_channels if kind == "out" else pruner.prune_in_channels)(m, idxs)


def _check_idxs(name: str, kind: str, idxs: list[int], n: int | None) -> None:
    if n is None:
        return
    if len(set(idxs)) != len(idxs) or any(i < 0 or i >= n for i in idxs) or len(idxs) >= n:
        raise ValueError(f"{name!r} has {n} {kind} channels; cannot remove {len(idxs)} of them at {idxs[:8]}...")


def replay_pruning_(
    model: nn.Module,
    history: Sequence[Mapping[str, Any]],
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> bool:
    """Re-apply recorded pruning events to ``model`` in place (e.g. a freshly built model before its
    checkpoint weights load). No example input or tracing is needed.

    The history is first replayed on a meta-device copy of the touched layers; only when every step fits
    (and the result matches ``shapes``) is ``model`` changed.

    Args:
        model: the model, unpruned, or already pruned exactly as recorded (then nothing happens).
        history: :meth:`PruningResult.record` of every event, in order.
        shapes: ``{parameter name: shape}`` expected at the end, e.g. recorded after the last event.

    Returns:
        ``True`` if the model was changed, ``False`` if it already had the recorded shapes.

    Raises:
        ValueError: the history does not fit ``model`` (another architecture or width); ``model`` is untouched.
    """
    ops, heads = _flatten(history)
    if not ops and not heads:
        return False
    params = dict(model.named_parameters())
    if shapes and all(n in params and tuple(params[n].shape) == tuple(s) for n, s in shapes.items()):
        for name, h in heads.items():
            _set_heads(model, name, h)
        sync_configs_(model)
        return False
    # dry run on meta copies of the touched modules
    skeletons: dict[str, nn.Module] = {}
    raw: dict[str, nn.Parameter] = {}

    def skel_module(name: str) -> nn.Module:
        if name not in skeletons:
            skeletons[name] = _skeleton(model.get_submodule(name))
        return skeletons[name]

    def skel_param(name: str) -> nn.Parameter:
        if name not in raw:
            p = model.get_parameter(name)
            raw[name] = nn.Parameter(torch.empty(p.shape, device="meta", dtype=p.dtype), p.requires_grad)
        return raw[name]

    def skel_set(name: str, p: nn.Parameter) -> None:
        raw[name] = p

    try:
        _run_ops(ops, skel_module, skel_param, skel_set)
        for name in heads:
            _num_heads(model.get_submodule(name))
        if shapes:
            got = {f"{m}.{n}": tuple(p.shape) for m, s in skeletons.items() for n, p in s.named_parameters()}
            got.update({n: tuple(p.shape) for n, p in raw.items()})
            for n, s in shapes.items():
                if n in got and got[n] != tuple(s):
                    raise ValueError(f"{n!r} would be {list(got[n])}, the checkpoint has {list(s)}")
    except (ValueError, AttributeError, IndexError, RuntimeError, TypeError) as err:
        raise ValueError(
            f"the recorded structured-pruning history does not fit this {type(model).__name__}: {err}. "
            f"Build the model with the hyper-parameters it was trained with; it was left unchanged."
        ) from err

    def set_param(name: str, p: nn.Parameter) -> None:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, p)

    _run_ops(ops, model.get_submodule, model.get_parameter, set_param)
    for name, h in heads.items():
        _set_heads(model, name, h)
    sync_configs_(model)
    return True


def _set_heads(model: nn.Module, name: str, heads: int) -> None:
    """Set an attention module's head count and, where it keeps them, its head size and total width
    (:data:`_HEAD_DIM_ATTRS`, :data:`_ALL_HEADS_ATTRS`) to match its projections. Scaling factors stay: a model
    whose head dimensions were pruned keeps the softmax temperature it was trained with."""
    attn = model.get_submodule(name)
    heads = int(heads)
    if isinstance(attn, nn.MultiheadAttention):
        attn.num_heads = heads
        attn.head_dim = attn.embed_dim // heads
        return
    attr = _heads_attr(attn)
    if attr is None:
        raise ValueError(f"module {name!r} ({type(attn).__name__}) has no int head count ({', '.join(_HEAD_ATTRS)})")
    setattr(attn, attr, heads)
    layers = _qkv_layers(attn)
    if not layers:
        return
    width = _qkv_width(layers)
    for key in _HEAD_DIM_ATTRS:
        if isinstance(attn.__dict__.get(key), int):
            setattr(attn, key, width // heads)
    for key in _ALL_HEADS_ATTRS:
        if isinstance(attn.__dict__.get(key), int):
            setattr(attn, key, width)


def sync_configs_(model: nn.Module) -> dict[str, int]:
    """Make Hugging Face style ``config`` objects agree with the pruned model: ``num_attention_heads`` (and
    ``head_dim``, where the config keeps one) become the attention modules' own values when every attention
    module sharing that config agrees (per-layer counts always live on the modules themselves).

    Returns:
        ``{attribute: value}`` set on the configs (empty when nothing changed).
    """
    by_config: dict[int, tuple[Any, list[nn.Module]]] = {}
    for m in model.modules():
        config = m.__dict__.get("config")
        if config is None or not isinstance(getattr(config, "num_attention_heads", None), int):
            continue
        if isinstance(m, nn.MultiheadAttention) or _heads_attr(m) is None or not _qkv_layers(m):
            continue
        by_config.setdefault(id(config), (config, []))[1].append(m)
    changed: dict[str, int] = {}
    for config, modules in by_config.values():
        heads = {_num_heads(m) for m in modules}
        if len(heads) == 1:
            h = heads.pop()
            if config.num_attention_heads != h:
                config.num_attention_heads = h
                changed["num_attention_heads"] = h
        dims = {int(m.__dict__[k]) for m in modules for k in _HEAD_DIM_ATTRS if isinstance(m.__dict__.get(k), int)}
        if len(dims) == 1 and isinstance(config.__dict__.get("head_dim"), int):
            d = dims.pop()
            if config.head_dim != d:
                config.head_dim = d
                changed["head_dim"] = d
    return changed


# ----------------------------------------------------------------------------------------------------------
# regularization


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
    excluded, _ = _excluded(model, exclude)
    head = output_layer_name(model)
    if head is not None:
        excluded.update(model.get_submodule(head).modules())
    num_heads = {layer: _num_heads(attn) for attn, layers in _find_attention(model).values() for layer in layers}
    inputs = _prepare_inputs(model, example_inputs)
    with _eager(model, grad=True), warnings.catch_warnings():
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
            unwrapped_parameters=_unwrapped_parameters(model),
            root_module_types=list(_ROOT_TYPES),
            forward_fn=_call,
        )


# ----------------------------------------------------------------------------------------------------------
# measuring and one-call API


def count_macs_params(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """Multiply-accumulates of one forward on ``example_inputs`` and the number of parameters.

    MACs are half of the FLOPs that :class:`torch.utils.flop_counter.FlopCounterMode` counts for matrix
    products and convolutions (attention kernels count where torch registers a formula for them).
    """
    inputs = _prepare_inputs(model, example_inputs)
    with _eager(model, grad=False):
        model.eval()
        with FlopCounterMode(display=False) as counter:
            _call(model, inputs)
    params = sum(p.numel() for p in model.parameters())
    return int(counter.get_total_flops()) // 2, int(params)


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
