"""The quantized Linear layers: bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` made safe to train, move,
checkpoint and reload.

Imported only through :func:`lightning_accel.quantization.bnb._layers` (it needs bitsandbytes). Both classes keep
bitsandbytes' state-dict format (``weight`` plus ``weight.absmax``, ``weight.quant_map``, ... for 4-bit; ``weight``
plus ``SCB`` and ``weight_format`` for int8) and the layer's own key names, and change what the upstream classes
get wrong for a Trainer:

* **Loading.** Upstream ``Linear4bit`` ignores the ``weight.*`` quantization-state keys on load (they pass the strict
  key check because their first component is ``weight``), so a reloaded layer silently keeps the absmax of its old
  weights; upstream ``Linear8bitLt`` refuses to load after its first forward (its scales moved to ``state``).
  Here the checkpoint's packed weight and quantization state replace the layer's, a float weight of the right shape is
  quantized on load, and anything else is reported as a load error instead of being copied.
* **Forward.** Upstream forwards cast the *bias parameter itself* to the input dtype (a bf16 step rounds the stored
  bias for good) and keep int8 scales in a side ``state`` object that ``Module.cpu()`` / ``.to()`` do not move.
  Here the bias is cast on the fly, int8 scales are a registered buffer (moved and broadcast like any buffer), inputs
  of any rank are flattened to 2-D (bitsandbytes' bias gradient assumes 2-D), and compute runs in ``compute_dtype``
  with the output returned in the input's dtype.
* **CPU layout.** Upstream ``Linear4bit`` repacks its weight into an AVX512-BF16 inference layout on the first
  no-grad CPU forward in eval mode (mutating the parameter's shape and, with double quantization, re-quantizing the
  statistics lossily on every save). Here the canonical layout is kept, so shapes, checkpoints and DDP broadcasts
  stay stable between training and validation.
* **Adapters.** An optional ``adapter`` child (:class:`~lightning_accel.quantization.adapters.LoRAAdapter`) is added
  to the output.
"""

from __future__ import annotations

import logging
from typing import Any

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from bitsandbytes.nn import Int8Params, Params4bit
from torch import nn

__all__ = ["QuantLinear4bit", "QuantLinear8bit", "dequantize_weight"]


class _DropCastNotice(logging.Filter):
    """bitsandbytes logs "inputs will be cast ... to float16" at WARNING level on *every* int8 inference call; that
    cast is how LLM.int8() quantizes activations, not a problem, so the record is dropped (nothing else is)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


_bnb_autograd_logger = logging.getLogger("bitsandbytes.autograd._functions")
if not any(isinstance(f, _DropCastNotice) for f in _bnb_autograd_logger.filters):
    _bnb_autograd_logger.addFilter(_DropCastNotice())


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(dtype)


class QuantLinear4bit(bnb.nn.Linear4bit):
    """A frozen 4-bit (NF4 or FP4) Linear layer with an optional LoRA adapter.

    Build it with :meth:`from_linear`; the weight is quantized on ``device`` at construction.
    """

    weight: Params4bit
    adapter: nn.Module | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        quant_type: str = "nf4",
        double_quant: bool = True,
        block_size: int = 64,
        compute_dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            bias,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type=quant_type,
            device=device,
        )
        self.weight.blocksize = block_size
        self.support_avx512bf16_for_cpu = False  # keep the canonical layout (module docstring)
        self.register_module("adapter", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        quant_type: str,
        double_quant: bool,
        block_size: int,
        compute_dtype: torch.dtype | None,
        device: torch.device,
    ) -> QuantLinear4bit:
        """Quantize ``linear``'s weight on ``device``; ``linear`` itself is left untouched."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            quant_type=quant_type,
            double_quant=double_quant,
            block_size=block_size,
            compute_dtype=compute_dtype,
            device="meta",
        )
        weight = Params4bit(
            linear.weight.detach().float(),
            requires_grad=False,
            blocksize=block_size,
            compress_statistics=double_quant,
            quant_type=quant_type,
            module=layer,
        )
        layer.weight = weight._quantize(device)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(device, copy=True), requires_grad=False)
        return layer

    @property
    def double_quant(self) -> bool:
        return bool(self.weight.quant_state.nested)

    @property
    def block_size(self) -> int:
        return int(self.weight.quant_state.blocksize)

    @property
    def quant_type(self) -> str:
        return str(self.weight.quant_state.quant_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.weight.quant_state
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        out = bnb.matmul_4bit(_flat(x, dtype), self.weight, quant_state=state, bias=bias)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self.adapter is not None:
            out = out + self.adapter(x)
        return out

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        stats = {k[len(key) + 1 :]: v for k, v in state_dict.items() if k.startswith(key + ".")}
        rest = {k: v for k, v in state_dict.items() if k != key and not k.startswith(key + ".")}
        nn.Module._load_from_state_dict(self, rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if key not in state_dict:
            return  # reported missing by the call above
        _forget(missing_keys, key)
        value = state_dict[key]
        device = self.weight.device
        if stats:
            try:
                state = bnbF.QuantState.from_dict(dict(stats), device=device)
            except (ValueError, KeyError, AssertionError) as err:
                error_msgs.append(f"unreadable 4-bit quantization state for {key!r}: {err}")
                return
            expected = (self.out_features, self.in_features)
            if tuple(state.shape) != expected or value.dtype not in (torch.uint8, self.weight.quant_storage):
                error_msgs.append(
                    f"size mismatch for {key!r}: the checkpoint holds a 4-bit weight of shape {tuple(state.shape)} "
                    f"stored as {value.dtype}, this layer is {expected}"
                )
                return
            self.weight.data = value.detach().to(device, copy=True)
            self.weight.quant_state = state
            self.weight.quant_type = state.quant_type
            self.weight.blocksize = state.blocksize
            self.weight.compress_statistics = state.nested
            self.quant_state = state
        elif value.is_floating_point() and tuple(value.shape) == (self.out_features, self.in_features):
            # a float checkpoint (e.g. pre-trained weights): quantize it with this layer's settings
            self.weight.data = value.detach().float()
            self.weight.bnb_quantized = False
            self.weight._quantize(device)
        else:
            error_msgs.append(
                f"cannot load {key!r} of dtype {value.dtype} and shape {tuple(value.shape)} into a 4-bit layer "
                f"({self.out_features}x{self.in_features}): the checkpoint has neither a float weight of that shape nor "
                f"the '{key}.*' quantization-state entries"
            )


class QuantLinear8bit(bnb.nn.Linear8bitLt):
    """A frozen int8 Linear layer (LLM.int8() row-wise weight scales) with an optional LoRA adapter.

    The weight is int8, the per-row scales are the ``SCB`` buffer. Build it with :meth:`from_linear`.
    """

    weight: Int8Params
    SCB: torch.Tensor
    adapter: nn.Module | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        compute_dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, has_fp16_weights=False, threshold=0.0, device=device)
        self.compute_dtype = compute_dtype
        self.register_buffer("SCB", torch.empty(out_features, device=device))
        self.register_module("adapter", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, compute_dtype: torch.dtype | None, device: torch.device) -> QuantLinear8bit:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype=compute_dtype, device="meta")
        cb, scb = _int8_rows(linear.weight.detach(), device)
        layer.weight = Int8Params(cb, requires_grad=False, has_fp16_weights=False)
        layer.SCB = scb
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(device, copy=True), requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = bnb.MatmulLtState()
        state.has_fp16_weights = False
        state.threshold = 0.0
        state.is_training = self.training
        state.CB = self.weight.data
        state.SCB = self.SCB.float()  # stays exact if the model is cast to another float dtype
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        out = bnb.matmul(_flat(x, dtype), self.weight, bias=bias, state=state)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self.adapter is not None:
            out = out + self.adapter(x)
        return out

    def to(self, *args: Any, **kwargs: Any) -> QuantLinear8bit:
        return nn.Module.to(self, *args, **kwargs)  # no side ``state`` to move: scales are a buffer

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)  # weight, bias, SCB
        # bitsandbytes' layout marker, so bitsandbytes' own Linear8bitLt can load this checkpoint too
        destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key, scb_key = prefix + "weight", prefix + "SCB"
        rest = {k: v for k, v in state_dict.items() if k not in (key, scb_key, prefix + "weight_format")}
        nn.Module._load_from_state_dict(self, rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if key not in state_dict:
            return
        _forget(missing_keys, key, scb_key)
        value, scb = state_dict[key], state_dict.get(scb_key)
        shape = (self.out_features, self.in_features)
        device = self.weight.device
        if value.dtype == torch.int8 and tuple(value.shape) == shape and scb is not None and tuple(scb.shape) == shape[:1]:
            self.weight.data = value.detach().to(device, copy=True)
            self.SCB = scb.detach().to(device, torch.float32, copy=True)
        elif value.is_floating_point() and tuple(value.shape) == shape:
            self.weight.data, self.SCB = _int8_rows(value.detach(), device)
        else:
            error_msgs.append(
                f"cannot load {key!r} of dtype {value.dtype} and shape {tuple(value.shape)} into an int8 layer "
                f"({shape[0]}x{shape[1]}): expected an int8 weight with its '{scb_key}' row scales, or a float weight"
            )


def _forget(missing_keys: list[str], *keys: str) -> None:
    """Drop keys this layer loads itself from the missing-key report (only filled when ``strict``)."""
    for k in keys:
        if k in missing_keys:
            missing_keys.remove(k)


def _int8_rows(weight: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 quantization (LLM.int8()): ``(int8 weight, float32 row scales)``."""
    cb, scb, _ = bnbF.int8_vectorwise_quant(weight.to(device=device, dtype=torch.float16).contiguous())
    return cb, scb.float()


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The float32 ``[out, in]`` weight a quantized layer computes with."""
    if isinstance(layer, QuantLinear4bit):
        return bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    if isinstance(layer, QuantLinear8bit):
        return layer.weight.data.float() * (layer.SCB.float().unsqueeze(1) / 127.0)
    raise TypeError(f"{type(layer).__name__} is not a quantized layer of lightning-accel")
