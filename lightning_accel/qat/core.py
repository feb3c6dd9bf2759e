"""Quantization-aware training: fake-quantized Linear and Conv layers, and their conversion to real low-bit layers.

Fake quantization rounds a layer's weight (and optionally its input) to the low-bit grid in the forward pass and
lets the gradient pass straight through (a straight-through estimator), so the model learns weights that survive
the rounding. The building blocks are torchao's:

* Linear layers become torchao's ``FakeQuantizedLinear`` (``quantize_(model, QATConfig(weight_config=...))``),
  whose ``weight_fake_quantizer`` is an ``IntxFakeQuantizer`` (int8 or int4, per output channel or per group of
  ``group_size`` inputs, symmetric or not). It is an ``nn.Linear`` that shares the original ``weight`` / ``bias``
  parameters, so state-dict keys and optimizer parameters stay the model's own.
* Conv layers become :class:`FakeQuantizedConv1d` / ``2d`` / ``3d`` (``nn.ConvNd`` subclasses, the same
  parameters), applying the same ``IntxFakeQuantizer`` to the weight seen as ``[out_channels, in x kernel]``.
* Inputs are observed by :class:`ActivationFakeQuantize`, torchao's PT2E ``FakeQuantize`` with a moving-average
  min/max observer (uint8, per tensor: the activation format of the int8 convolutions of PT2E's
  ``X86InductorQuantizer``); its statistics are buffers of the model (``<layer>.activation_fake_quantizer.*``).
  Convolutions always carry one (a real int8 convolution needs the input's range); Linear layers only with
  ``activations=True``.

Why a module swap rather than PT2E's QAT flow (``prepare_qat_pt2e``) for convolutions: the PT2E flow turns the
model into an exported ``GraphModule`` during training, whose state-dict keys are not the model's, which cannot
be rebuilt before a checkpoint's weights load without re-exporting it, and which breaks a forward that takes
keyword arguments. The swap keeps the model's own modules and forward. At conversion (:func:`convert_qat_`) each
convolution becomes the static int8 convolution PT2E's recipe produces, as a module
(:class:`~lightning_accel.quantization.pt2e.Int8Conv`, the layer ``Quantization`` makes too): the trained int8
weight grid with the weight fake quantizer's own scales, and the uint8 input scale / zero point of the observed
input range, so the real int8 convolution computes what the fake-quantized one trained on.

Conversion (:func:`convert_qat_`), per layer type and bit width:

============  =======  ==============================================================================  =========
layer         bits     real layer                                                                      backend
============  =======  ==============================================================================  =========
Linear        8        torchao ``Int8DynamicActivationInt8WeightConfig`` (int8 x int8 matmul; inputs    torchao
                       quantized per token at run time), the same layers as ``Quantization`` makes
Linear        8        bitsandbytes row-wise int8 (CUDA)                                                bitsandbytes
Linear        4        torchao packed int4 for CPUs (``Int4OpaqueTensor``, tinygemm kernel): the        torchao
                       trained int4 values and scales are packed exactly, no re-quantization
Conv1d/2d     8        PT2E ``X86InductorQuantizer`` static int8 convolution (``pt2e.Int8Conv``,       torchao
                       the ops ``convert_pt2e`` emits; inductor lowers them to oneDNN int8)
============  =======  ==============================================================================  =========

The pure core:

    names = prepare_qat_(model, bits=4, granularity="per_group", group_size=32)   # fake-quantized layers
    set_qat_flags_(model, weights=True, activations=False, observers=True)        # what is on
    ... train ...
    record = convert_qat_(model, backend="torchao")                              # real int8/int4 layers
    strip_qat_(model)                                                             # or back to float layers
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from lightning_accel._compat import register_state_dict_hooks
from lightning_accel._select import NoMatchError, select_modules, set_submodule
from lightning_accel._validate import check_bool, check_choice, check_int, check_patterns
from lightning_accel.errors import QATWarning  # noqa: F401 (public here too)
from lightning_accel.quantization.backends import (
    QuantConfig,
    get_backend,
    is_attention_projection,
    quantized_layers_by_backend,
    recorded_layer,
)
from lightning_accel.quantization.pt2e import Int8Conv, new_observer, replay_int8_convs_, why_not_int8_conv
from lightning_accel.quantization.torchao import is_int8_tensor, require_torchao

__all__ = [
    "BITS",
    "CONVERT_BACKENDS",
    "GRANULARITIES",
    "ActivationFakeQuantize",  # noqa: F822 - built on first use (module __getattr__), so importing needs no torchao
    "FakeQuantizedConv1d",
    "FakeQuantizedConv2d",
    "FakeQuantizedConv3d",
    "QATWarning",
    "check_convertible",
    "converted_layers",
    "convert_qat_",
    "fake_quantized_layers",
    "prepare_qat_",
    "select_qat_layers",
    "set_qat_flags_",
    "strip_qat_",
    "unconvert_",
    "weight_fake_quantize_config",
]

BITS: tuple[int, ...] = (8, 4)
GRANULARITIES: tuple[str, ...] = ("per_channel", "per_group")
CONVERT_BACKENDS: tuple[str, ...] = ("torchao", "bitsandbytes")
_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: group sizes the CPU int4 kernel (tinygemm) packs; a larger trained group is packed as several of these
_INT4_PACK_GROUPS: tuple[int, ...] = (128, 64, 32)


def _quiet_torchao() -> None:
    require_torchao()


# ---------------------------------------------------------------------- fake quantizers
def weight_fake_quantize_config(bits: int = 8, granularity: str = "per_channel", group_size: int = 64, symmetric: bool = True) -> Any:
    """torchao's ``IntxFakeQuantizeConfig`` for weights: int8 or int4, per output channel or per group of
    ``group_size`` consecutive inputs, symmetric (zero maps to zero) or affine."""
    check_choice("bits", bits, BITS)
    check_choice("granularity", granularity, GRANULARITIES)
    _quiet_torchao()
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    dtype = torch.int8 if bits == 8 else torch.int4  # type: ignore[attr-defined]  # torch's stubs lack int4
    if granularity == "per_channel":
        return IntxFakeQuantizeConfig(dtype, "per_channel", is_symmetric=symmetric)
    return IntxFakeQuantizeConfig(dtype, "per_group", group_size=group_size, is_symmetric=symmetric)


def _fake_quantize_base() -> type:
    _quiet_torchao()
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize

    return FakeQuantize


def _make_activation_class() -> type:
    FakeQuantize = _fake_quantize_base()
    from torchao.quantization.pt2e.observer import MovingAverageMinMaxObserver

    class ActivationFakeQuantize(FakeQuantize):  # type: ignore[misc, valid-type]
        """int8 (uint8, per tensor, affine) fake quantization of a layer's input with a moving-average min/max
        observer (torchao PT2E's ``FakeQuantize``; straight-through gradient inside the range).

        The observer updates only in training mode and while ``observer_enabled``; fake quantization applies
        while ``fake_quant_enabled`` and once a range has been observed. Its statistics (``scale``,
        ``zero_point``, ``activation_post_process.min_val`` / ``max_val``) are buffers: they are checkpointed with
        the model.
        """

        def __init__(self, averaging_constant: float = 0.01) -> None:
            super().__init__(
                observer=MovingAverageMinMaxObserver,
                quant_min=0,
                quant_max=255,
                dtype=torch.quint8,
                qscheme=torch.per_tensor_affine,
                averaging_constant=averaging_constant,
            )
            self.register_load_state_dict_post_hook(self._sync_flags)

        # Python mirrors of the ``observer_enabled`` / ``fake_quant_enabled`` buffers and of "a range was
        # observed": the forward branches on them, so torch.compile traces it without a graph break or a
        # ``.item()`` per call; they follow the buffers through :meth:`set_flags` and checkpoint loading.
        _observe: bool = True
        _fake_quant: bool = True
        _seen: bool = False

        @property
        def observed(self) -> bool:
            """Whether a range has been observed (fake quantization needs one)."""
            return self._seen

        def set_flags(self, *, fake_quant: bool, observe: bool) -> None:
            self.fake_quant_enabled.fill_(int(fake_quant))
            self.observer_enabled.fill_(int(observe))
            self._fake_quant, self._observe = bool(fake_quant), bool(observe)

        def _sync_flags(self, *_: Any) -> None:  # after a state dict loaded, the observer's included
            self._fake_quant = bool(self.fake_quant_enabled[0] == 1)
            self._observe = bool(self.observer_enabled[0] == 1)
            self._seen = bool(torch.isfinite(self.activation_post_process.min_val).item())

        def _observe_(self, x: torch.Tensor) -> None:
            """torchao's ``MovingAverageMinMaxObserver.forward`` without its branches on tensor values: the first
            observation is known from the Python flag ``_seen`` (the observer's ``min_val == inf`` test), so
            torch.compile traces it without a graph break. The arithmetic is torchao's, so the numbers are too."""
            obs = self.activation_post_process
            if x.numel() == 0:
                return
            cur_min, cur_max = torch.aminmax(x.detach().to(obs.min_val.dtype))
            if self._seen:
                c = obs.averaging_constant
                cur_min = obs.min_val + c * (cur_min - obs.min_val)
                cur_max = obs.max_val + c * (cur_max - obs.max_val)
            obs.min_val.copy_(cur_min)
            obs.max_val.copy_(cur_max)

        def _qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
            """torchao's ``_calculate_qparams`` for a per-tensor affine observer that has seen a range, without its
            validity checks (branches on tensor values): the same formulas, shaped ``[1]`` like torchao's."""
            obs = self.activation_post_process
            quant_min, quant_max = obs.quant_min, obs.quant_max
            min_val_neg = torch.min(obs.min_val, torch.zeros_like(obs.min_val))
            max_val_pos = torch.max(obs.max_val, torch.zeros_like(obs.max_val))
            scale = (max_val_pos - min_val_neg) / float(quant_max - quant_min)
            scale = torch.max(scale, obs.eps)
            zero_point = quant_min - torch.round(min_val_neg / scale).to(torch.int)
            zero_point = torch.clamp(zero_point, quant_min, quant_max)
            return scale.reshape(1), zero_point.reshape(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training and self._observe and x.numel() > 0:
                self._observe_(x)
                scale, zero_point = self._qparams()
                if self.scale.shape != scale.shape:
                    self.scale.resize_(scale.shape)
                    self.zero_point.resize_(zero_point.shape)
                self.scale.copy_(scale)
                self.zero_point.copy_(zero_point)
                if not self._seen:
                    self._seen = True
            if self._fake_quant and self._seen:
                out = torch.fake_quantize_per_tensor_affine(
                    x.float(), self.scale.float(), self.zero_point.int(), self.quant_min, self.quant_max
                )
                return out.to(x.dtype)
            return x

        def range(self) -> tuple[float, float]:
            """The observed ``(min, max)`` of the input."""
            obs = self.activation_post_process
            return float(obs.min_val), float(obs.max_val)

    ActivationFakeQuantize.__module__ = __name__
    ActivationFakeQuantize.__qualname__ = "ActivationFakeQuantize"
    return ActivationFakeQuantize


_ACTIVATION_CLASS: type | None = None


def _activation_class() -> type:
    global _ACTIVATION_CLASS
    if _ACTIVATION_CLASS is None:
        _ACTIVATION_CLASS = _make_activation_class()
    return _ACTIVATION_CLASS


def __getattr__(name: str) -> Any:
    if name == "ActivationFakeQuantize":
        return _activation_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def new_activation_fake_quantizer() -> nn.Module:
    """A fresh :class:`ActivationFakeQuantize` (observer on, fake quantization on)."""
    return _activation_class()()


if TYPE_CHECKING:  # the mixin is only ever combined with a convolution: type-check it as one
    _ConvBase = nn.modules.conv._ConvNd
else:
    _ConvBase = object


class _FakeQuantizedConvMixin(_ConvBase):
    """The forward and conversions shared by the fake-quantized convolutions."""

    weight_fake_quantizer: nn.Module
    activation_fake_quantizer: nn.Module | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_fake_quantizer is not None:
            x = self.activation_fake_quantizer(x)
        w = self.weight
        if getattr(self.weight_fake_quantizer, "enabled", True):
            # a view of a parameter made under no_grad still requires grad but has no grad_fn, which breaks module
            # hooks that track gradients (the FlopCounter of Lightning's ModelSummary): no gradient is needed there
            flat = w.flatten(1) if torch.is_grad_enabled() else w.detach().flatten(1)
            w = self.weight_fake_quantizer(flat).view_as(w)
        return self._conv_forward(x, w, self.bias)

    @classmethod
    def from_conv(cls, conv: nn.Module, weight_config: Any, activation_fake_quantizer: nn.Module | None) -> nn.Module:
        from torchao.quantization.qat import IntxFakeQuantizer

        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.__dict__.update({k: v for k, v in conv.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")})
        new._parameters = dict(conv._parameters)  # the same Parameter objects: optimizers and masks keep them
        new._buffers = dict(conv._buffers)
        new._modules = dict(conv._modules)
        new.weight_fake_quantizer = IntxFakeQuantizer(weight_config)
        new.activation_fake_quantizer = activation_fake_quantizer
        return new

    def to_conv(self) -> nn.Module:
        base = next(b for b in type(self).__mro__ if b in _CONVS)
        new = base.__new__(base)
        nn.Module.__init__(new)
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")})
        new._parameters = dict(self._parameters)
        new._buffers = dict(self._buffers)
        new._modules = {k: v for k, v in self._modules.items() if k not in ("weight_fake_quantizer", "activation_fake_quantizer")}
        return new


class FakeQuantizedConv1d(_FakeQuantizedConvMixin, nn.Conv1d):
    """``nn.Conv1d`` with a fake-quantized weight and an observed (optionally fake-quantized) input."""


class FakeQuantizedConv2d(_FakeQuantizedConvMixin, nn.Conv2d):
    """``nn.Conv2d`` with a fake-quantized weight and an observed (optionally fake-quantized) input."""


class FakeQuantizedConv3d(_FakeQuantizedConvMixin, nn.Conv3d):
    """``nn.Conv3d`` with a fake-quantized weight and an observed (optionally fake-quantized) input."""


_FQ_CONV: dict[type[nn.Module], type[_FakeQuantizedConvMixin]] = {
    nn.Conv1d: FakeQuantizedConv1d,
    nn.Conv2d: FakeQuantizedConv2d,
    nn.Conv3d: FakeQuantizedConv3d,
}


def _is_fq_linear(module: nn.Module) -> bool:
    return type(module).__name__ == "FakeQuantizedLinear" and type(module).__module__.startswith("torchao")


def _is_fq(module: nn.Module) -> bool:
    return isinstance(module, _FakeQuantizedConvMixin) or _is_fq_linear(module)


def _weight_fq(layer: nn.Module) -> Any:
    """The ``weight_fake_quantizer`` (torchao's ``IntxFakeQuantizer``, untyped) of a fake-quantized layer."""
    return layer.weight_fake_quantizer


def _activation_fq(layer: nn.Module) -> Any:
    """The ``activation_fake_quantizer`` (an :class:`ActivationFakeQuantize`, built at run time, or ``None``) of a
    fake-quantized layer."""
    return layer.activation_fake_quantizer


def fake_quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified name: layer}`` of the fake-quantized Linear and Conv layers of ``model``."""
    return {n: m for n, m in model.named_modules() if _is_fq(m)}


# ---------------------------------------------------------------------- selection and preparation
def select_qat_layers(
    model: nn.Module, modules: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> dict[str, nn.Module]:
    """The Linear and Conv layers quantization-aware training acts on: ``modules`` / ``exclude`` glob patterns on
    qualified or class names; by default every ``nn.Linear`` and ``nn.ConvNd`` except the output layer (and except
    ``nn.MultiheadAttention.out_proj``, whose weight attention reads directly). Layers already fake-quantized are
    included, so a second preparation changes nothing.

    Raises:
        NoMatchError: a pattern matches nothing, or nothing is left to act on.
        ValueError: ``modules`` names a layer that cannot be fake-quantized (an attention ``out_proj``, a subclass
            with its own forward).
    """
    modules = check_patterns("modules", modules)
    exclude = check_patterns("exclude", exclude)
    selected = select_modules(model, modules, exclude, types=(nn.Linear, *_CONVS), what="modules")
    chosen: dict[str, nn.Module] = {}
    for name, layer in selected.items():
        if _is_fq(layer):
            chosen[name] = layer
            continue
        if isinstance(layer, nn.Linear) and is_attention_projection(model, name):
            if modules is not None:
                raise ValueError(
                    f"`modules` selects {name!r}, the output projection of an nn.MultiheadAttention: attention reads its "
                    "weight directly (F.multi_head_attention_forward), so fake quantization there would be bypassed; "
                    "exclude it, e.g. exclude=['*.out_proj']"
                )
            continue
        if type(layer) not in (nn.Linear, *_CONVS):
            if modules is not None:
                raise ValueError(
                    f"`modules` selects {name!r}, a {type(layer).__name__}: only plain nn.Linear / nn.ConvNd layers can be "
                    "fake-quantized (a subclass may have its own forward)"
                )
            continue
        chosen[name] = layer
    if not chosen:
        raise NoMatchError(f"no plain nn.Linear or nn.ConvNd layer of {type(model).__name__} is left to fake-quantize")
    return chosen


def _check_groups(name: str, layer: nn.Module, granularity: str, group_size: int) -> None:
    if granularity != "per_group":
        return
    width = layer.in_features if isinstance(layer, nn.Linear) else cast(torch.Tensor, layer.weight)[0].numel()
    if width % group_size:
        what = "in_features" if isinstance(layer, nn.Linear) else "in_channels/groups x kernel size"
        raise ValueError(
            f"`group_size`={group_size} does not divide {name!r}'s {what} ({width}): choose a divisor, "
            "granularity='per_channel', or exclude the layer"
        )


def prepare_qat_(
    model: nn.Module,
    modules: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    bits: int = 8,
    granularity: str = "per_channel",
    group_size: int = 64,
    symmetric: bool = True,
    activations: bool = False,
    *,
    names: Sequence[str] | None = None,
) -> list[str]:
    """Swap the selected layers of ``model`` for fake-quantized ones, in place.

    Args:
        model: any ``nn.Module``.
        modules: glob patterns of the layers, e.g. ``["blocks.*"]``; ``None``: every Linear and Conv but the output
            layer (see :func:`select_qat_layers`).
        exclude: glob patterns removed from the selection, e.g. ``["embed"]``.
        bits: weight bits, ``8`` or ``4``.
        granularity: ``"per_channel"`` (one scale per output channel) or ``"per_group"`` (one per ``group_size``
            consecutive inputs of an output channel).
        group_size: inputs per scale with ``"per_group"``, e.g. ``32``.
        symmetric: symmetric weight grid (zero stays exactly zero: pruned weights stay pruned).
        activations: also fake-quantize the inputs of Linear layers (convolutions always observe theirs).
        names: exactly these layers (qualified names) instead of ``modules`` / ``exclude`` (used by replays).

    Returns:
        The qualified names of the fake-quantized layers (including those that already were).

    Raises:
        ValueError: a bad argument, a ``group_size`` that does not divide a layer's input width.
        NoMatchError: nothing selected.
        ImportError: torchao is missing.
    """
    check_choice("bits", bits, BITS)
    check_choice("granularity", granularity, GRANULARITIES)
    check_int("group_size", group_size, low=2)
    check_bool("symmetric", symmetric)
    check_bool("activations", activations)
    if names is not None:
        chosen = {}
        for n in names:
            try:
                chosen[n] = model.get_submodule(n)
            except AttributeError as err:
                raise ValueError(f"the recorded fake-quantized layer {n!r} does not exist in {type(model).__name__}") from err
            if not isinstance(chosen[n], (nn.Linear, *_CONVS)):
                raise ValueError(f"the recorded fake-quantized layer {n!r} is a {type(chosen[n]).__name__} in this model")
    else:
        chosen = select_qat_layers(model, modules, exclude)
    for name, layer in chosen.items():
        _check_groups(name, layer, granularity, group_size)  # every check before any change
    config = weight_fake_quantize_config(bits, granularity, group_size, symmetric)
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    linears = {id(m) for m in chosen.values() if type(m) is nn.Linear}
    if linears:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(model, QATConfig(weight_config=config, step="prepare"), filter_fn=lambda m, fqn: id(m) in linears)
    for name, layer in chosen.items():
        if type(layer) in _FQ_CONV:
            act = new_activation_fake_quantizer().to(cast(torch.Tensor, layer.weight).device)
            new = _FQ_CONV[type(layer)].from_conv(layer, config, act)
            new.train(layer.training)
            set_submodule(model, name, new)
    for name in chosen:
        prepared: Any = model.get_submodule(name)  # torchao's FakeQuantizedLinear (untyped) or a FakeQuantizedConvNd
        if _is_fq_linear(prepared) and activations and prepared.activation_fake_quantizer is None:
            prepared.activation_fake_quantizer = new_activation_fake_quantizer().to(prepared.weight.device)
        prepared._qat_activations = activations
    return list(chosen)


def set_qat_flags_(model: nn.Module, *, weights: bool, activations: bool, observers: bool) -> None:
    """Switch fake quantization of weights and inputs, and observation of input ranges, on or off.

    ``activations`` applies to the layers prepared with ``activations=True``; convolutions prepared without it
    keep observing their input (for conversion) but do not fake-quantize it.
    """
    for layer in fake_quantized_layers(model).values():
        _weight_fq(layer).enabled = bool(weights)
        act = _activation_fq(layer)
        if act is not None:
            act.set_flags(fake_quant=activations and getattr(layer, "_qat_activations", True), observe=observers)


def strip_qat_(model: nn.Module) -> list[str]:
    """Swap every fake-quantized layer back for a plain ``nn.Linear`` / ``nn.ConvNd`` holding the same parameters
    (the observers are dropped). Returns the names."""
    names = []
    for name, layer in fake_quantized_layers(model).items():
        new = cast(Any, layer).to_linear() if _is_fq_linear(layer) else cast(_FakeQuantizedConvMixin, layer).to_conv()
        new.train(layer.training)
        set_submodule(model, name, new)
        names.append(name)
    return names


# ---------------------------------------------------------------------- conversion
def _fake_quantized_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weight of ``layer`` (``[out, in]``, a convolution's seen as ``[out, in x kernel]``) as its weight fake
    quantizer rounds it now, with the scales and zero points it used (``[out, groups]``)."""
    fq = _weight_fq(layer)
    w = cast(torch.Tensor, layer.weight).detach().float()
    w = w.flatten(1) if w.dim() > 2 else w
    was = fq.enabled
    fq.enabled = True
    with torch.no_grad():
        dq = fq(w)  # computes the scales and zero points of the current weight
    fq.enabled = was
    return dq, fq.scale.detach().float().reshape(w.shape[0], -1), fq.zero_point.detach().float().reshape(w.shape[0], -1)


def _input_qparams(input_range: tuple[float, float]) -> tuple[float, int]:
    """The uint8 scale and zero point of an input whose observed range is ``input_range``, as the x86 recipe's
    input observer (its dtype, scheme and range) computes them from a min / max."""
    from torchao.quantization.pt2e.observer import MinMaxObserver

    spec = new_observer("input_activation")
    obs = MinMaxObserver(dtype=spec.dtype, qscheme=spec.qscheme, quant_min=spec.quant_min, quant_max=spec.quant_max)
    obs.min_val = torch.tensor(float(input_range[0]))
    obs.max_val = torch.tensor(float(input_range[1]))
    scale, zero_point = obs.calculate_qparams()
    return float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0])


def _to_int8_conv(layer: _FakeQuantizedConvMixin, input_range: tuple[float, float]) -> Int8Conv:
    """The :class:`~lightning_accel.quantization.pt2e.Int8Conv` (PT2E's x86 static int8 convolution, as
    ``Quantization`` makes) of a fake-quantized convolution: its weight as the trained int8 grid values and the weight
    fake quantizer's own per-channel scales (no re-quantization), its input scale and zero point from the observed
    ``input_range``, so it computes what the fake-quantized layer does with ``activations=True``."""
    dq, scale, _ = _fake_quantized_weight(layer)  # symmetric (check_convertible): zero points are 0
    scale = scale.reshape(-1)
    q = torch.round(dq / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp(-128, 127)
    s, zp = _input_qparams(input_range)
    new = Int8Conv(layer.to_conv(), q.reshape(layer.weight.shape).to(torch.int8), scale, s, zp)
    new.train(layer.training)
    return new


def _int4_pack_group(width: int) -> int | None:
    return next((g for g in _INT4_PACK_GROUPS if width % g == 0), None)


def _int4_weight(layer: nn.Module) -> Any:
    """The fake quantizer's int4 values and scales of ``layer``'s weight, packed for torchao's CPU int4 kernel
    exactly (tinygemm computes ``(u - 8) * scale + zero``: ``u = q + 8``, ``zero = -zero_point * scale``)."""
    from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    w = cast(torch.Tensor, layer.weight).detach()
    dq, scale, zero_point = _fake_quantized_weight(layer)
    trained_group = w.shape[1] // scale.shape[1]
    g = _int4_pack_group(trained_group)
    if g is None:
        raise ValueError(f"int4 group of {trained_group} inputs cannot be packed (needs a multiple of 32)")
    rep = trained_group // g
    s_full = scale.repeat_interleave(trained_group, dim=1)
    zp_full = zero_point.repeat_interleave(trained_group, dim=1)
    q = torch.round(dq / s_full + zp_full).clamp(-8, 7)
    u = (q + 8).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    s_pack = scale.repeat_interleave(rep, dim=1)
    z_pack = (-zero_point * scale).repeat_interleave(rep, dim=1)
    scale_and_zero = pack_tinygemm_scales_and_zeros(s_pack, z_pack, torch.float32)
    return Int4OpaqueTensor(qdata=packed, scale_and_zero=scale_and_zero, block_size=[1, g], shape=w.shape, act_pre_scale=None)


def _int4_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict hook: a packed int4 weight is saved as plain tensors (``weight``: packed uint8,
    ``weight_scale_and_zero``), loadable with any ``map_location`` and ``weights_only=True``."""
    w = state_dict.get(prefix + "weight")
    if w is not None and type(w).__name__ == "Int4OpaqueTensor":
        state_dict[prefix + "weight"] = w.qdata.detach()
        state_dict[prefix + "weight_scale_and_zero"] = w.scale_and_zero.detach()


def _load_int4(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    sz = state_dict.pop(prefix + "weight_scale_and_zero", None)
    if sz is None:
        return
    weight: Any = module.weight  # torchao's Int4OpaqueTensor (untyped) once converted
    if type(weight).__name__ != "Int4OpaqueTensor":
        return
    with torch.no_grad():
        weight.qdata.copy_(state_dict[prefix + "weight"])
        weight.scale_and_zero.copy_(sz)
    state_dict[prefix + "weight"] = weight.detach()


def _to_int4_linear(layer: nn.Module) -> nn.Linear:
    weight = _int4_weight(layer)
    new = cast(Any, layer).to_linear()  # torchao's FakeQuantizedLinear.to_linear
    new.weight = nn.Parameter(weight, requires_grad=False)
    register_state_dict_hooks(new, _int4_state, _load_int4)
    new._accel_int4 = True
    return new


def converted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of the layers :func:`convert_qat_` made (int8 convolutions,
    :class:`~lightning_accel.quantization.pt2e.Int8Conv`; torchao int8 / int4 and bitsandbytes int8 Linear layers)."""
    found = {n: m for n, m in model.named_modules() if getattr(m, "_accel_int4", False)}
    found.update({n: m for n, (_, m) in quantized_layers_by_backend(model).items()})
    return dict(sorted(found.items(), key=lambda kv: list(dict(model.named_modules())).index(kv[0])))


def check_convertible(layers: dict[str, nn.Module], bits: int, granularity: str, symmetric: bool, backend: str) -> None:
    """Raise ``ValueError`` before training when the fake-quantized ``layers`` cannot become real ``backend``
    layers (which formats each backend stores is in the module docstring)."""
    convs = [n for n, m in layers.items() if isinstance(m, _CONVS)]
    linears = [n for n, m in layers.items() if isinstance(m, nn.Linear)]
    if convs and (bits != 8 or granularity != "per_channel" or not symmetric):
        raise ValueError(
            f"convolutions {convs[:3]} convert to PT2E int8 convolutions (symmetric, per output channel); got bits={bits}, "
            f"granularity={granularity!r}, symmetric={symmetric}: exclude them (e.g. exclude=['Conv2d']) or use convert='none'"
        )
    for n in convs:
        layer = layers[n]
        why = why_not_int8_conv(layer.to_conv() if isinstance(layer, _FakeQuantizedConvMixin) else layer)
        if why is not None:
            raise ValueError(
                f"{n!r}: {why}; it cannot become a PT2E int8 convolution: exclude it or use "
                "convert='none'"
            )
    if bits == 4:
        if backend != "torchao":
            raise ValueError(
                "bits=4 converts with torchao (packed int4 for CPUs); bitsandbytes stores 4-bit weights as NF4/FP4 codes, "
                "not the uniform int4 grid QAT trains on. Use convert='torchao', 'auto' or 'none'"
            )
        for n in linears:
            linear = cast(nn.Linear, layers[n])
            group: int | None
            if granularity == "per_channel":
                group = linear.in_features
            else:
                group = _weight_fq(linear).config.group_size if _is_fq(linear) else None
            if group is not None and _int4_pack_group(group) is None:
                raise ValueError(
                    f"{n!r}: int4 groups of {group} inputs cannot be packed for torchao's CPU int4 kernel (needs a multiple "
                    "of 32): choose group_size 32/64/128/..., exclude the layer, or use convert='none'"
                )
    elif linears and (granularity != "per_channel" or not symmetric):
        raise ValueError(
            f"bits=8 Linear layers convert to int8 with one symmetric scale per output channel ({backend}); got "
            f"granularity={granularity!r}, symmetric={symmetric}: use per_channel + symmetric, or convert='none'"
        )


def convert_qat_(model: nn.Module, backend: str = "torchao", *, compute_dtype: str = "auto") -> dict[str, Any]:
    """Convert every fake-quantized layer of ``model`` to a real low-bit layer, in place (see the module docstring).

    Linear layers first become plain ``nn.Linear`` again through torchao's own convert step
    (``quantize_(model, QATConfig(step="convert"))``), then are quantized with the base config matching their fake
    quantization, so the converted weights are the trained grid values.

    Args:
        model: a model prepared by :func:`prepare_qat_` (and trained).
        backend: ``"torchao"`` (CPU int8 / int4) or ``"bitsandbytes"`` (int8 Linear layers, CUDA).
        compute_dtype: bitsandbytes only: as for :func:`~lightning_accel.quantization.quantize_`.

    Returns:
        A record: ``{"backend", "bits", "linear": [names], "conv": {name: {"min", "max", "scale", "zero_point"}}}``,
        what :func:`replay_converted_` needs to rebuild the same layers on a fresh model.

    Raises:
        ValueError: a layer cannot be converted (:func:`check_convertible`), or a convolution never observed its
            input range (fake quantization never ran); the model is left unchanged then.
    """
    check_choice("backend", backend, CONVERT_BACKENDS)
    layers = fake_quantized_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no fake-quantized layer to convert (prepare_qat_ first)")
    first = next(iter(layers.values()))
    cfg = _weight_fq(first).config
    bits = 8 if cfg.dtype == torch.int8 else 4
    from torchao.quantization.granularity import PerGroup

    granularity = "per_group" if isinstance(cfg.granularity, PerGroup) else "per_channel"
    check_convertible(layers, bits, granularity, cfg.is_symmetric, backend)
    ranges = {}
    for name, layer in layers.items():
        if isinstance(layer, _FakeQuantizedConvMixin):
            act = _activation_fq(layer)
            if not act.observed:
                raise ValueError(
                    f"{name!r} never observed its input range (fake quantization did not run: `start` beyond the fit?); "
                    "it cannot become a static int8 convolution"
                )
            ranges[name] = act.range()
    record: dict[str, Any] = {"backend": backend, "bits": bits, "linear": [], "conv": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torchao").setLevel(logging.ERROR)
        for name, layer in layers.items():
            if isinstance(layer, _FakeQuantizedConvMixin):
                conv = _to_int8_conv(layer, ranges[name])
                scale, zero_point = conv._input_qparams
                record["conv"][name] = {"min": ranges[name][0], "max": ranges[name][1], "scale": scale, "zero_point": zero_point}
                set_submodule(model, name, conv)
        linears = {n: m for n, m in layers.items() if _is_fq_linear(m)}
        if linears and bits == 4:
            for name, layer in linears.items():
                new = _to_int4_linear(layer)
                new.train(layer.training)
                set_submodule(model, name, new)
        elif linears:
            from torchao.quantization import quantize_
            from torchao.quantization.qat import QATConfig

            ids = {id(m) for m in linears.values()}
            quantize_(model, QATConfig(step="convert"), filter_fn=lambda m, fqn: id(m) in ids)  # torchao's convert step
            plain = {n: model.get_submodule(n) for n in linears}
            # int8 Linear layers of the registered backend (torchao: Int8DynamicActivationInt8WeightConfig, as
            # Quantization(backend="torchao"); bitsandbytes: row-wise int8)
            get_backend(backend, "convert").quantize_(model, plain, QuantConfig(mode="int8", compute_dtype=compute_dtype))
        record["linear"] = list(linears)
    return record


def unconvert_(model: nn.Module, names: Sequence[str]) -> None:
    """Replace the converted layers ``names`` by float layers of the same shape (convolutions hold the dequantized
    weights, Linear layers fresh ones): for loading a checkpoint of the fake-quantized model into a converted one."""
    quantized = quantized_layers_by_backend(model)
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, Int8Conv):
            new = layer.to_float()
        elif name in quantized or getattr(layer, "_accel_int4", False) or is_int8_tensor(getattr(layer, "weight", None)):
            linear = cast(nn.Linear, layer)
            new = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None)
            if linear.bias is not None:
                new.bias = nn.Parameter(linear.bias.detach().float().clone())
        else:
            continue
        new.train(layer.training)
        set_submodule(model, name, new)


def replay_converted_(model: nn.Module, record: dict[str, Any], settings: dict[str, Any]) -> None:
    """Rebuild on a fresh (float or fake-quantized) model the converted layers ``record`` describes, so a
    checkpoint of the converted model loads into it. Layers already converted are left alone.

    Convolutions become empty :class:`~lightning_accel.quantization.pt2e.Int8Conv` layers (the checkpoint holds
    their int8 weights, scales and input scale / zero point); Linear layers are fake-quantized and converted again
    (their checkpointed weights then load).

    Raises:
        ValueError: a recorded layer is missing or of another type in ``model``.
    """
    present = converted_layers(model)
    convs = [n for n in record.get("conv", {}) if n not in present]
    for name in convs:
        layer = recorded_layer(model, name, "converted the convolution")
        if isinstance(layer, _FakeQuantizedConvMixin):
            set_submodule(model, name, layer.to_conv())
    replay_int8_convs_(model, convs)
    todo = [n for n in record.get("linear", []) if n not in present]
    if not todo:
        return
    fresh = [n for n in todo if not _is_fq(model.get_submodule(n))]
    if fresh:
        prepare_qat_(
            model,
            bits=settings["bits"],
            granularity=settings["granularity"],
            group_size=settings["group_size"],
            symmetric=settings["symmetric"],
            activations=settings["activations"],
            names=fresh,
        )
    # the convert leaves layers outside `todo` as they are: strip the rest of the fake quantization temporarily
    keep = {n: m for n, m in fake_quantized_layers(model).items() if n not in todo}
    for n in keep:
        set_submodule(model, n, nn.Identity())
    try:
        convert_qat_(model, record["backend"])
    finally:
        for n, m in keep.items():
            set_submodule(model, n, m)


