"""Replaying a recorded pruning history: :func:`replay_pruning_` re-applies :meth:`PruningResult.record` events to a
freshly built model before its weights load; it needs no example input and leaves the model untouched when the
history does not fit.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops as tp_ops
from torch_pruning.pruner.function import ParameterPruner

from lightning_accel.pruning.attention import head_count, set_heads, sync_configs_
from lightning_accel.pruning.widths import sync_widths_

__all__ = ["replay_pruning_"]


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
            set_heads(model, name, h)
        sync_configs_(model)
        sync_widths_(model)
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
            head_count(model.get_submodule(name))
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
        set_heads(model, name, h)
    sync_configs_(model)
    sync_widths_(model)
    return True
