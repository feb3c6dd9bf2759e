""":func:`quantize_`: quantize a plain ``nn.Module``'s layers in place with any registered backend (no Trainer).

    from lightning_accel import quantize_
    quantize_(model, mode="nf4")                                # bitsandbytes 4-bit, every Linear but the output layer
    quantize_(model, "int8", modules=["blocks.*.mlp.*"])        # bitsandbytes int8 (LLM.int8() row-wise)
    quantize_(model, mode="int8", backend="torchao")            # torchao int8 Linear layers, fast once compiled on a CPU
    quantize_(model, mode="int8", backend="pt2e", calibration=batches)  # static int8 convolutions

The backend is looked up once in the registry (:mod:`~lightning_accel.quantization.backends`); ``"auto"`` is the first
registered backend whose formats include ``mode`` (bitsandbytes for ``"int8"``, ``"nf4"``, ``"fp4"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_accel._validate import check_bool, check_choice, check_patterns
from lightning_accel.quantization.backends import (
    QuantConfig,
    QuantizationBackend,
    get_backend,
    registered_backends,
    select_layers,
)
from lightning_accel.quantization.bnb import BLOCK_SIZES, COMPUTE_DTYPES
from lightning_accel.quantization.plan import other_backend_hint

__all__ = ["backend_for_mode", "quantize_"]


def backend_for_mode(mode: str, backend: str = "auto") -> QuantizationBackend:
    """The registered backend that quantizes to ``mode``: ``backend`` itself, or for ``"auto"`` the first registered
    one whose ``modes`` include ``mode``.

    Raises:
        ValueError: an unknown ``backend`` (the message lists the registered ones), or a ``mode`` that backend (or,
            for ``"auto"``, every backend) does not have.
    """
    if backend == "auto":
        check_choice("mode", mode, dict.fromkeys(m for b in registered_backends().values() for m in b.modes))
        return next(b for b in registered_backends().values() if mode in b.modes)
    chosen = get_backend(backend)
    check_choice("mode", mode, chosen.modes)
    return chosen


def quantize_(
    model: nn.Module,
    mode: str = "nf4",
    modules: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    double_quant: bool = True,
    block_size: int = 64,
    compute_dtype: str = "auto",
    *,
    device: torch.device | str | None = None,
    backend: str = "auto",
    activation: str = "dynamic",
    calibration: Iterable[Any] | None = None,
    run: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """Replace selected layers of ``model`` by quantized ones of a registered backend, in place.

    Args:
        model: any ``nn.Module``.
        mode: the weight format: ``"nf4"``, ``"fp4"`` (4-bit blocks) or ``"int8"``, e.g. ``"nf4"``.
        modules: glob patterns on qualified or class names, e.g. ``["blocks.*"]``; ``None``: every layer the backend
            takes (``nn.Linear``; for ``"pt2e"`` ``nn.Conv1d`` / ``nn.Conv2d``) except the output layer (and except
            ``nn.MultiheadAttention.out_proj``, which attention bypasses).
        exclude: glob patterns removed from the selection, e.g. ``["embed"]``.
        double_quant: bitsandbytes 4-bit only: quantize the per-block absmax to 8 bits too, e.g. ``True``.
        block_size: bitsandbytes 4-bit only: weights per absmax block, one of 64, 128, ..., 4096, e.g. ``64``.
        compute_dtype: bitsandbytes: ``"auto"`` (bf16 where the device supports it, else fp32), ``"fp32"``,
            ``"bf16"`` or ``"fp16"`` (CUDA only), e.g. ``"auto"``.
        device: bitsandbytes: where to quantize and keep the layers, e.g. ``"cuda"``; ``None``: each layer's device.
        backend: a registered backend name (``"bitsandbytes"``, ``"torchao"``: int8 Linear, ``"pt2e"``: int8
            convolutions) or ``"auto"``: the first registered backend with ``mode`` (bitsandbytes), e.g. ``"auto"``.
        activation: torchao: ``"dynamic"`` (int8 x int8 matmuls) or ``"weight_only"``, e.g. ``"dynamic"``.
        calibration: pt2e: the batches whose inputs calibrate the convolutions, e.g. a list of tensors.
        run: pt2e: runs ``model`` on one calibration batch; default ``model(batch)`` (``model(batch[0])`` for a
            tuple).

    Returns:
        ``{qualified name: what it replaced}`` (the float layers for bitsandbytes and pt2e, the float weights for
        torchao); keep it to undo with the backend's ``restore_``, drop it to free the memory. Layers already
        quantized are skipped, so a second call changes nothing.

    Raises:
        ImportError: the backend's library is not installed.
        ValueError: a bad argument, an unknown ``backend``, a ``mode`` it does not have, ``compute_dtype="fp16"`` on
            CPU, a selected layer that cannot be quantized (an attention ``out_proj``, a Linear subclass), or
            convolutions without ``calibration``.
        NoMatchError: the model has no layer the backend takes, or a pattern selects nothing.
    """
    chosen = backend_for_mode(mode, backend)
    modules = check_patterns("modules", modules)
    exclude = check_patterns("exclude", exclude)
    check_bool("double_quant", double_quant)
    check_choice("block_size", block_size, BLOCK_SIZES)
    check_choice("compute_dtype", compute_dtype, COMPUTE_DTYPES)
    check_choice("activation", activation, ("dynamic", "weight_only"))
    try:
        layers = select_layers(model, (chosen,), modules, exclude)[chosen.name]
    except ValueError as err:
        hint = other_backend_hint(model, (chosen,), mode, functional=True)
        if hint is None:
            raise
        raise type(err)(f"{err}. {hint}") from err
    config = QuantConfig(
        mode=mode,
        double_quant=double_quant,
        block_size=block_size,
        compute_dtype=compute_dtype,
        device=device,
        activation=activation,
        calibration=None if calibration is None else list(calibration),
        run=run,
    )
    return chosen.quantize_(model, layers, config)
