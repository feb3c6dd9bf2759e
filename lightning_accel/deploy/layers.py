"""Which layers the pipeline made int8, and the float model the other runtimes convert.

Found by duck typing, so any int8 layer of the package (and of torchao) is recognized without importing the
quantization code:

* ``"dynamic"``: an ``nn.Linear`` whose weight is a torchao int8 tensor subclass (``weight.dequantize()``);
  int8 activations quantized per call (torchao's ``Int8DynamicActivationInt8WeightConfig``);
* ``"static"``: a PT2E-style int8 convolution (``Int8Conv``: ``to_float()``, a calibrated ``input_scale``);
* ``"qat"``: a fake-quantized layer of quantization-aware training (``to_conv()`` / ``to_linear()``).

:func:`float_view` is a copy of the model with those layers as plain float layers holding the dequantized int8
weights (so their values are on the int8 grid the pipeline trained), the form ONNX and OpenVINO convert.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import nn

__all__ = ["conv_batch_norm_pairs", "float_view", "fold_batch_norms_", "int8_kind", "int8_scope", "quantizable_layers"]


def _is_subclass_weight(w: Any) -> bool:
    return isinstance(w, torch.Tensor) and type(w) not in (torch.Tensor, nn.Parameter) and callable(getattr(w, "dequantize", None))


def int8_kind(module: nn.Module) -> str | None:
    """``"dynamic"``, ``"static"`` or ``"qat"`` for an int8 layer of the pipeline (see the module docstring), else
    ``None``."""
    if isinstance(module, nn.Linear) and _is_subclass_weight(module.weight):
        return "dynamic"
    if callable(getattr(module, "to_float", None)) and hasattr(module, "input_scale"):
        return "static"
    if callable(getattr(module, "to_conv", None)) or (callable(getattr(module, "to_linear", None)) and hasattr(module, "weight_fake_quantizer")):
        return "qat"
    return None


def int8_scope(model: nn.Module) -> dict[str, str]:
    """``{qualified name: kind}`` of the int8 layers of ``model``."""
    out = {}
    for name, m in model.named_modules():
        kind = int8_kind(m)
        if kind is not None:
            out[name] = kind
    return out


def quantizable_layers(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` (and int8 layer) of ``model``: the scope of ``int8="all"``."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) or int8_kind(m)]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _copy(model: nn.Module) -> nn.Module:
    memo: dict[int, Any] = {}
    trainer = getattr(model, "_trainer", None)
    if trainer is not None:  # a LightningModule attached to a Trainer: do not copy the Trainer
        memo[id(trainer)] = None
    return copy.deepcopy(model, memo)


@torch.no_grad()
def float_view(model: nn.Module) -> nn.Module:
    """A float copy of ``model`` (in eval mode): every int8 layer becomes the float layer of its dequantized weights."""
    view = _copy(model).eval()
    for name, kind in int8_scope(view).items():
        layer: Any = view.get_submodule(name)
        if kind == "dynamic":
            layer.weight = nn.Parameter(layer.weight.dequantize().float().clone(), requires_grad=False)
        elif kind == "static":
            _set(view, name, layer.to_float().eval())
        else:
            to_float = getattr(layer, "to_conv", None) or layer.to_linear
            _set(view, name, to_float().eval())
    return view


def conv_batch_norm_pairs(program: torch.export.ExportedProgram) -> dict[str, str]:
    """``{convolution module: the batch norm module that alone reads its output}`` in a captured program."""

    def module(node: Any) -> str | None:
        stack = node.meta.get("nn_module_stack")
        return list(stack.values())[-1][0] if stack else None

    out: dict[str, str] = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and "batch_norm" in str(node.target) and node.args:
            src = node.args[0]
            if getattr(src, "op", None) == "call_function" and "conv" in str(src.target) and len(src.users) == 1:
                bn, conv = module(node), module(src)
                if bn and conv:
                    out[conv] = bn
    return out


@torch.no_grad()
def fold_batch_norms_(view: nn.Module, pairs: dict[str, str]) -> list[str]:
    """Fold each batch norm of ``pairs`` into its convolution (eval mode), in place: the runtimes then see one
    convolution per layer, named after the convolution. Per-channel int8 weights stay on their grid (the fold
    scales each output channel). Returns the convolutions folded."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    done = []
    for conv_name, bn_name in pairs.items():
        conv, bn = view.get_submodule(conv_name), view.get_submodule(bn_name)
        if type(conv) not in (nn.Conv1d, nn.Conv2d) or not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
            continue
        _set(view, conv_name, fuse_conv_bn_eval(cast(Any, conv).eval(), cast(Any, bn).eval()))
        _set(view, bn_name, nn.Identity())
        done.append(conv_name)
    return done
