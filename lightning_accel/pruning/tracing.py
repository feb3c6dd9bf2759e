"""How structured pruning traces and runs a model: what torch-pruning's tracing is given (the root layer types, the
``exclude`` patterns resolved to modules and parameters, parameters outside known layers, the forward call) and how
a model runs on its example inputs (eagerly, on its device, naming the module that raised).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import nn
from torch_pruning import ops as tp_ops

from lightning_accel._select import NoMatchError, describe_candidates, matches, name_matches

__all__ = [
    "ROOT_TYPES",
    "call_model",
    "describe_failure",
    "module_stack",
    "prepare_inputs",
    "resolve_exclude",
    "run_eagerly",
    "tensor_shapes",
    "unwrapped_parameters",
]


#: The layer types whose output channels root a prunable group.
ROOT_TYPES = (tp_ops.TORCH_CONV, tp_ops.TORCH_LINEAR, tp_ops.TORCH_LSTM)


def unwrapped_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
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


def resolve_exclude(model: nn.Module, exclude: Sequence[str] | None) -> tuple[set[nn.Module], set[int]]:
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


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def prepare_inputs(model: nn.Module, example_inputs: Any) -> Any:
    """Example inputs on the model's device, as ordinary (non-inference) tensors."""
    device = _device_of(model)
    with torch.inference_mode(False):
        return apply_to_collection(example_inputs, torch.Tensor, lambda t: t.detach().to(device).clone())


def call_model(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def tensor_shapes(out: Any) -> list[tuple[int, ...]]:
    found: list[tuple[int, ...]] = []
    apply_to_collection(out, torch.Tensor, lambda t: found.append(tuple(t.shape)))
    return found


@contextlib.contextmanager
def run_eagerly(model: nn.Module, grad: bool) -> Iterator[None]:
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
def module_stack(model: nn.Module, names: Mapping[nn.Module, str]) -> Iterator[list[str]]:
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


def describe_failure(model: nn.Module, stack: list[str]) -> str:
    if not stack or stack[-1] == "":
        return f"the forward of {type(model).__name__}"
    name = stack[-1]
    try:
        cls = type(model.get_submodule(name)).__name__
    except AttributeError:
        cls = "?"
    return f"module {name!r} ({cls})"
