"""Low-rank adapters (LoRA) on frozen Linear layers, and merging them back into float weights for export.

An adapter is a child module named ``adapter`` of the layer it adapts, so the layer's own keys stay as they were
(``blocks.0.attn.qkv.weight``) and the adapter adds ``blocks.0.attn.qkv.adapter.lora_A`` / ``.lora_B`` next to them
(a wrapper module would have moved the base to ``...qkv.base_layer.weight``). Quantized layers of
:mod:`lightning_accel.quantization` host an adapter directly; a plain ``nn.Linear`` is turned into a
:class:`LoRALinear` (same keys, frozen base).

    quantize_(model, mode="nf4")
    add_adapters_(model, rank=8)          # only the adapters (and non-quantized layers) train
    ...
    merge_adapters_(model)                 # adapted layers become plain float nn.Linear again
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from lightning_accel._select import NoMatchError, output_layer_name, select_modules, set_submodule
from lightning_accel._validate import check_int, check_number, check_patterns
from lightning_accel.quantization.bnb import (
    dequantize_weight,
    is_quantized_layer,
    quantized_layers,
    replace_by_float_linear_,
)

__all__ = [
    "LoRAAdapter",
    "LoRALinear",
    "add_adapters_",
    "adapted_layers",
    "freeze_except_adapters_",
    "merge_adapters_",
    "replay_adapters_",
]


class LoRAAdapter(nn.Module):
    """``x -> dropout(x) @ A.T @ B.T * alpha / rank``: the trainable low-rank update of a frozen layer.

    ``B`` starts at zero, so adding an adapter does not change the layer's output (Hu et al., 2021).

    Args:
        in_features: input width of the adapted layer, e.g. ``64``.
        out_features: output width of the adapted layer, e.g. ``192``.
        rank: rank of the update, e.g. ``8``.
        alpha: scale numerator (the update is multiplied by ``alpha / rank``), e.g. ``16.0``.
        dropout: dropout on the adapter's input during training, e.g. ``0.05``.

    Raises:
        ValueError: a bad argument.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_int("rank", rank, low=1)
        check_number("alpha", alpha, low=0.0, low_inclusive=False)
        check_number("dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x).to(self.lora_A.dtype)
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The ``[out, in]`` update this adapter adds to its layer's weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


class LoRALinear(nn.Linear):
    """A float ``nn.Linear`` with a frozen weight and a LoRA ``adapter``; keys as the original layer's."""

    adapter: LoRAAdapter

    @classmethod
    def from_linear(cls, linear: nn.Linear, adapter: LoRAAdapter) -> LoRALinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        layer.adapter = adapter
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.adapter(x)


def _is_quantized(module: nn.Module) -> bool:
    return is_quantized_layer(module)


def adapted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified name: layer}`` of every layer of ``model`` carrying an adapter."""
    return {n: m for n, m in model.named_modules() if isinstance(getattr(m, "adapter", None), LoRAAdapter)}


def add_adapters_(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    modules: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[str]:
    """Attach a trainable :class:`LoRAAdapter` to layers of ``model``, in place; their base weights are frozen.

    Args:
        model: the model, e.g. one passed through :func:`~lightning_accel.quantization.quantize_`.
        rank: adapter rank, e.g. ``8``.
        alpha: the update is scaled by ``alpha / rank``, e.g. ``16.0``.
        dropout: dropout on the adapters' inputs, e.g. ``0.05``.
        modules: glob patterns of Linear layers to adapt, e.g. ``["blocks.*.attn.*"]``; ``None``: every quantized
            layer (a plain ``nn.Linear`` named here becomes a :class:`LoRALinear`).
        exclude: glob patterns removed from the selection, e.g. ``["embed"]``.

    Returns:
        The qualified names of the layers that got an adapter (layers that already had one are left alone).

    Raises:
        ValueError: a bad argument.
        NoMatchError: a pattern matches no Linear layer, or (``modules=None``) the model has no quantized layer.
    """
    check_int("rank", rank, low=1)
    check_number("alpha", alpha, low=0.0, low_inclusive=False)
    check_number("dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
    modules = check_patterns("modules", modules)
    exclude = check_patterns("exclude", exclude)
    if modules is None:
        hosts = {n: m for n, m in model.named_modules() if _is_quantized(m)}
        if not hosts:
            raise NoMatchError(
                f"{type(model).__name__} has no quantized layer to adapt: quantize it first, or name float Linear "
                "layers in `modules`"
            )
        if exclude:
            keep = select_modules(model, None, exclude, types=(nn.Linear,), include_output=True, what="modules")
            hosts = {n: m for n, m in hosts.items() if n in keep}
    else:
        hosts = select_modules(model, modules, exclude, types=(nn.Linear,), include_output=True, what="modules")
    added = []
    for name, layer in hosts.items():
        if getattr(layer, "adapter", None) is not None:
            continue
        linear = cast(nn.Linear, layer)  # selected as nn.Linear (quantized layers subclass it)
        adapter = LoRAAdapter(linear.in_features, linear.out_features, rank, alpha, dropout, device=linear.weight.device)
        if _is_quantized(layer):
            layer.adapter = adapter
        elif type(layer) is nn.Linear:
            set_submodule(model, name, LoRALinear.from_linear(layer, adapter))
        else:
            raise ValueError(
                f"cannot add an adapter to {name!r}: it is a {type(layer).__name__}, not a plain nn.Linear or a "
                "quantized layer of lightning-accel"
            )
        added.append(name)
    return added


def freeze_except_adapters_(model: nn.Module, trainable: list[str] | None = None) -> dict[str, int]:
    """Freeze every parameter of ``model`` except the LoRA adapters and the modules matching ``trainable``
    (QLoRA: embeddings, norms and biases of the base stay frozen too).

    Args:
        model: a model with adapters (:func:`add_adapters_`).
        trainable: glob patterns (the :mod:`lightning_accel._select` rule) of modules that keep training, e.g.
            ``["classifier"]``; ``None``: the output layer (the last Linear/Conv) only; ``[]`` is not allowed
            (pass patterns or ``None``).

    Returns:
        ``{"trainable": n, "total": n}`` parameter counts afterwards.

    Raises:
        NoMatchError: a ``trainable`` pattern matches no module.
    """
    if trainable is None:
        head = output_layer_name(model)
        keep = {head: model.get_submodule(head)} if head is not None else {}
    else:
        keep = select_modules(model, trainable, types=(nn.Module,), include_output=True, what="trainable")
    kept = {id(p) for m in keep.values() for p in m.parameters()}
    kept |= {id(p) for layer in adapted_layers(model).values() for p in cast(LoRAAdapter, layer.adapter).parameters()}
    total = trainable_count = 0
    for p in model.parameters():
        p.requires_grad_(id(p) in kept)
        total += p.numel()
        trainable_count += p.numel() if p.requires_grad else 0
    return {"trainable": trainable_count, "total": total}


@torch.no_grad()
def merge_adapters_(model: nn.Module) -> list[str]:
    """Fold every adapter into its layer's weight, in place: adapted layers become plain float32 ``nn.Linear``.

    For a quantized base the float weight is the dequantized weight plus the adapter's update, so the merged model
    computes what the adapted model computed (up to the quantized layers' compute dtype), at float size, ready to
    export or to quantize again.

    Args:
        model: a model with adapters, e.g. after fine-tuning with ``Quantization(adapter_rank=8)``.

    Returns:
        The qualified names of the merged layers.
    """
    merged = []
    for name, layer in adapted_layers(model).items():
        adapter = cast(LoRAAdapter, layer.adapter)
        base = dequantize_weight(layer) if _is_quantized(layer) else cast(nn.Linear, layer).weight.detach().float()
        replace_by_float_linear_(model, name, layer, base + adapter.delta_weight().to(base.device))
        merged.append(name)
    return merged



def replay_adapters_(model: nn.Module, names: Sequence[str], rank: int, alpha: float, dropout: float) -> None:
    """Give the quantized layers ``names`` of ``model`` the (untrained) adapters a checkpoint recorded, so its
    ``lora_A`` / ``lora_B`` weights load; layers that have one of that rank already are left alone.

    Raises:
        ValueError: a recorded layer is not a quantized layer here, or has an adapter of another rank.
    """
    layers = quantized_layers(model)
    for name in names:
        layer = layers.get(name)
        if layer is None:
            raise ValueError(f"the checkpoint has an adapter on {name!r}, which is not a quantized layer here")
        existing = cast("LoRAAdapter | None", layer.adapter)
        if existing is not None:
            if existing.rank != rank:
                raise ValueError(f"{name!r} has an adapter of rank {existing.rank}, the checkpoint's is rank {rank}")
            continue
        linear = cast(nn.Linear, layer)
        layer.adapter = LoRAAdapter(linear.in_features, linear.out_features, rank, alpha, dropout, device=linear.weight.device)
