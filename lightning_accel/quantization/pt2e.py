"""Static int8 convolutions for CPUs: torchao's PT2E recipe for x86 (``X86InductorQuantizer``), one layer at a time.

PT2E quantizes a convolution by observing its inputs on calibration data (a histogram observer, uint8 per
tensor) and its weight (int8, symmetric, one scale per output channel), then rewrites it as
``quantize -> dequantize -> conv(dequantized int8 weight)`` with ``quantized_decomposed`` ops; inductor (through
``torch.compile`` or :func:`lightning_accel.export`) lowers that pattern to oneDNN int8 convolutions.

:class:`Int8Conv` is exactly that rewritten graph as a module swapped in for the convolution: the observers and
the quantizer's configuration are torchao's (:func:`quantizer_config`, from
``get_default_x86_inductor_quantization_config``), the ops are the ones ``convert_pt2e`` emits (a test checks the
outputs against ``convert_pt2e`` of the same layer). Swapping modules rather than exporting the whole model keeps
the model's own ``forward`` (keyword arguments, dict outputs), its module names and state-dict keys, so a
checkpoint of the quantized model loads into a freshly built one (:func:`replay_int8_convs_`) and training code
keeps working. The pure core:

    convs = select_int8_convs(model)                       # every Conv1d/Conv2d (padding_mode "zeros")
    observers = calibrate_(model, convs, batches)          # run the float model, observe the inputs
    originals = quantize_convs_int8_(model, convs, observers)
    restore_convs_(model, originals)                       # undo

In eager mode these layers are *slower* than float (each input is quantized and the weight dequantized in
Python); compiled or exported they run as int8 convolutions. :class:`Pt2eConvBackend` is this module's entry in the
backend registry (:mod:`~lightning_accel.quantization.backends`, ``"pt2e"``, serving ``backend="torchao"``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F

from lightning_accel._select import set_submodule
from lightning_accel.quantization.backends import (
    QuantConfig,
    QuantizationBackend,
    recorded_layer,
    register_backend,
    select_layers,
)
from lightning_accel.quantization.torchao import TORCHAO, require_torchao

__all__ = [
    "CONV_TYPES",
    "PT2E",
    "Pt2eConvBackend",
    "Int8Conv",
    "calibrate_",
    "int8_conv_footprint",
    "int8_convs",
    "new_observer",
    "quantize_convs_int8_",
    "quantizer_config",
    "replay_int8_convs_",
    "restore_convs_",
    "select_int8_convs",
    "select_int8_layers",
    "why_not_int8_conv",
]

#: The convolutions that quantize to int8 (what inductor's x86 int8 lowering handles).
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)
_IN_MIN, _IN_MAX = 0, 255  # uint8 inputs, per tensor (affine)
_W_MIN, _W_MAX = -128, 127  # int8 weights, per output channel (symmetric)


def quantizer_config() -> Any:
    """torchao's default static int8 configuration of ``X86InductorQuantizer`` (the observers used here)."""
    require_torchao()
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        get_default_x86_inductor_quantization_config,
    )

    return get_default_x86_inductor_quantization_config()


def new_observer(which: str) -> Any:
    """A fresh torchao observer for ``which`` (``"input_activation"`` or ``"weight"``) of :func:`quantizer_config`,
    built from its quantization spec as ``prepare_pt2e`` builds it (dtype, range, scheme, channel axis)."""
    import dataclasses

    spec = getattr(quantizer_config(), which)
    kwargs = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "observer_or_fake_quant_ctr"}
    ctr = spec.observer_or_fake_quant_ctr
    cls = getattr(getattr(ctr, "p", None), "func", ctr)
    if "PerChannel" not in cls.__name__:
        kwargs.pop("ch_axis", None)
    return ctr.with_args(**kwargs)()


@functools.cache
def _qd() -> Any:
    """``torch.ops.quantized_decomposed``, registered by torchao (imported once: ``forward`` calls this)."""
    require_torchao()
    import torchao.quantization.pt2e  # noqa: F401  (registers torch.ops.quantized_decomposed)

    return torch.ops.quantized_decomposed


class Int8Conv(nn.Module):
    """A convolution with int8 weights (one scale per output channel) and uint8 inputs (one calibrated scale and
    zero point), computed as PT2E's ``X86InductorQuantizer`` rewrites it (a ``Conv1d`` as the equivalent ``Conv2d`` of height 1:
    the quantizer and inductor's int8 lowering handle 2-d convolutions).

    State-dict entries: ``weight`` (int8; ``[out, in, 1, k]`` for a ``Conv1d``), ``weight_scale``, ``bias`` (float, or absent), ``input_scale``,
    ``input_zero_point``. Build it from a float convolution with :meth:`from_float`, or with zeros of the right
    shapes (:meth:`empty_like`) for a checkpoint to load into.
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor
    input_scale: torch.Tensor
    input_zero_point: torch.Tensor
    bias: nn.Parameter | None

    def __init__(
        self,
        conv: nn.Module,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        input_scale: float,
        input_zero_point: int,
    ) -> None:
        super().__init__()
        conv = cast(nn.modules.conv._ConvNd, conv)  # a Conv1d / Conv2d with numeric padding (why_not_int8_conv)
        self.dim = len(conv.kernel_size)
        self.conv_type = type(conv).__name__
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding = cast("tuple[int, ...]", conv.padding)
        self.dilation, self.groups = conv.dilation, conv.groups
        if self.dim == 1 and weight.dim() == 3:  # a Conv1d runs as a Conv2d of height 1: the form inductor lowers
            weight = weight.unsqueeze(2)
        self.register_buffer("weight", weight.to(torch.int8))
        self.register_buffer("weight_scale", weight_scale.to(torch.float32))
        self.register_buffer("weight_zero_point", torch.zeros(weight.shape[0], dtype=torch.int64), persistent=False)
        bias = None if conv.bias is None else conv.bias.detach().to(torch.float32).clone()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("input_scale", torch.tensor(float(input_scale)))
        self.register_buffer("input_zero_point", torch.tensor(int(input_zero_point), dtype=torch.int64))
        self._sync_input_qparams()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_float(cls, conv: nn.Module, input_scale: float, input_zero_point: int) -> Int8Conv:
        """Quantize ``conv``'s weight with torchao's per-channel observer of the x86 configuration."""
        qd = _qd()
        observer = new_observer("weight")
        w = cast(torch.Tensor, conv.weight).detach().float()
        observer(w)
        scale, zero_point = observer.calculate_qparams()
        qweight = qd.quantize_per_channel.default(w, scale, zero_point, 0, _W_MIN, _W_MAX, torch.int8)
        return cls(conv, qweight, scale, input_scale, input_zero_point)

    @classmethod
    def empty_like(cls, conv: nn.Module) -> Int8Conv:
        """A layer of ``conv``'s shape whose int8 state is still to be loaded from a checkpoint."""
        weight = cast(torch.Tensor, conv.weight)
        w = torch.zeros(weight.shape, dtype=torch.int8, device=weight.device)
        return cls(conv, w, torch.ones(w.shape[0], device=w.device), 1.0, 0)

    def to_float(self) -> nn.Module:
        """The float convolution of the same shape with the dequantized weight."""
        cls: Callable[..., nn.modules.conv._ConvNd] = {1: nn.Conv1d, 2: nn.Conv2d}[self.dim]
        conv = cls(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            self.groups, bias=self.bias is not None, device=self.weight.device,
        )
        with torch.no_grad():
            conv.weight.copy_(self.dequantized_weight().reshape(conv.weight.shape))
            if self.bias is not None:
                cast(torch.Tensor, conv.bias).copy_(self.bias)
        return conv

    # ------------------------------------------------------------------ compute
    def dequantized_weight(self) -> torch.Tensor:
        return _qd().dequantize_per_channel.default(
            self.weight, self.weight_scale, self.weight_zero_point, 0, _W_MIN, _W_MAX, torch.int8
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = _qd()
        dtype = x.dtype
        x = x.float()
        s, zp = self._input_qparams  # Python numbers: constants in a traced graph, as convert_pt2e emits them
        xq = qd.quantize_per_tensor.default(x, s, zp, _IN_MIN, _IN_MAX, torch.uint8)
        xd = qd.dequantize_per_tensor.default(xq, s, zp, _IN_MIN, _IN_MAX, torch.uint8)
        if self.dim == 1:  # as a Conv2d of height 1 (PT2E's x86 quantizer and inductor handle 2-d convolutions)
            y = F.conv2d(
                xd.unsqueeze(2), self.dequantized_weight(), self.bias, (1, *self.stride), (0, *self.padding),
                (1, *self.dilation), self.groups,
            )
            return y.squeeze(2).to(dtype)
        y = F.conv2d(xd, self.dequantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)
        return y.to(dtype)

    # ------------------------------------------------------------------ state
    def _sync_input_qparams(self) -> None:
        self._input_qparams = (float(self.input_scale), int(self.input_zero_point))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_input_qparams()

    def extra_repr(self) -> str:
        s, zp = self._input_qparams
        return (
            f"{self.conv_type}({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}), int8 weights per channel, uint8 inputs (scale {s:.4g}, zero point {zp})"
        )


# ---------------------------------------------------------------------- selection
def why_not_int8_conv(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot become an :class:`Int8Conv` (``None``: it can)."""
    if type(layer) not in CONV_TYPES:
        return f"a {type(layer).__name__} (only plain nn.Conv1d / nn.Conv2d)"
    if layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r} (only 'zeros')"
    if isinstance(layer.padding, str):
        return f"padding={layer.padding!r} (give the padding as numbers)"
    return None


def select_int8_convs(model: nn.Module, selected: dict[str, nn.Module], *, strict: bool) -> dict[str, nn.Module]:
    """The convolutions among ``selected`` (``{name: module}``, e.g. from ``select_modules``) that quantize to int8.

    Raises:
        ValueError: ``strict`` (the user named the layers) and a selected convolution cannot be quantized; the
            message says why.
    """
    chosen: dict[str, nn.Module] = {}
    for name, layer in selected.items():
        if isinstance(layer, Int8Conv) or not isinstance(layer, nn.modules.conv._ConvNd):
            continue
        why = why_not_int8_conv(layer)
        if why is not None:
            if strict:
                raise ValueError(f"`modules` selects {name!r}, {why}: it cannot be quantized to int8; exclude it")
            continue
        chosen[name] = layer
    return chosen


def select_int8_layers(
    model: nn.Module, modules: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> tuple[dict[str, nn.Linear], dict[str, nn.Module]]:
    """The float Linear layers (torchao dynamic int8) and convolutions (static int8) that int8 post-training
    quantization on a CPU would replace: every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` except the output
    layer by default, or those ``modules`` names, less ``exclude`` (:func:`~lightning_accel.quantization.backends.
    select_layers` over the ``"torchao"`` and ``"pt2e"`` backends).

    Raises:
        NoMatchError: a pattern matches no such layer, or nothing is left to quantize (the message lists the
            candidates).
        ValueError: ``modules`` names a layer that cannot be quantized (the message says why).
    """
    picked = select_layers(model, (TORCHAO, PT2E), modules, exclude)
    return cast("dict[str, nn.Linear]", picked[TORCHAO.name]), picked[PT2E.name]


def int8_convs(model: nn.Module) -> dict[str, Int8Conv]:
    """The :class:`Int8Conv` layers of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Int8Conv)}


# ---------------------------------------------------------------------- calibration and conversion
@torch.no_grad()
def calibrate_(model: nn.Module, convs: dict[str, nn.Module], batches: Iterable[Any], run: Callable[[Any], Any]) -> dict[str, Any]:
    """Observe the inputs of ``convs`` while ``run(batch)`` runs ``model`` (in eval mode) on each of ``batches``.

    Returns:
        ``{name: torchao observer}`` (the x86 configuration's input observer, a histogram observer).

    Raises:
        ValueError: no batch reached one of the layers (``batches`` was empty, or the layer is not used).
    """
    observers = {name: new_observer("input_activation") for name in convs}
    handles = [conv.register_forward_pre_hook(_observe(observers[name])) for name, conv in convs.items()]
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for batch in batches:
                run(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    unseen = [n for n, o in observers.items() if not _observed(o)]
    if unseen:
        raise ValueError(
            f"calibration never ran the convolutions {unseen[:5]}{' ...' if len(unseen) > 5 else ''}: there was no "
            "calibration batch, or the model's forward does not use them; exclude unused layers (`exclude`)"
        )
    return observers


def _observe(observer: Any) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple) -> None:
        observer(args[0].detach().float())

    return hook


def _observed(observer: Any) -> bool:
    lo = getattr(observer, "min_val", None)
    return lo is not None and lo.numel() > 0 and bool(torch.isfinite(lo).all())


@torch.no_grad()
def quantize_convs_int8_(model: nn.Module, convs: dict[str, nn.Module], observers: dict[str, Any]) -> dict[str, nn.Module]:
    """Replace each of ``convs`` by an :class:`Int8Conv` with the input range its observer saw, in place.

    Returns:
        ``{name: the float convolution it replaced}``, for :func:`restore_convs_`.
    """
    originals = {}
    for name, conv in convs.items():
        scale, zero_point = observers[name].calculate_qparams()
        new = Int8Conv.from_float(conv, float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0]))
        new.train(conv.training)
        set_submodule(model, name, new)
        originals[name] = conv
    return originals


def restore_convs_(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Put back the float convolutions :func:`quantize_convs_int8_` replaced."""
    for name, module in originals.items():
        set_submodule(model, name, module)


def replay_int8_convs_(model: nn.Module, names: Sequence[str]) -> None:
    """Swap :class:`Int8Conv` layers (to be filled by a checkpoint) in for the convolutions ``names`` of a freshly
    built float model; layers already int8 are left alone.

    Raises:
        ValueError: a recorded layer is missing or is not a convolution that quantizes.
    """
    for name in names:
        layer = recorded_layer(model, name, "quantized the convolution")
        if isinstance(layer, Int8Conv):
            continue
        why = why_not_int8_conv(layer)
        if why is not None:
            raise ValueError(f"the checkpoint quantized {name!r} to an int8 convolution, but here it is {why}")
        set_submodule(model, name, Int8Conv.empty_like(layer))


def int8_conv_footprint(model: nn.Module) -> dict[str, Any]:
    """Stored bytes of the int8 convolutions' weights (int8 data + per-channel scales) and bits per weight."""
    layers = int8_convs(model)
    weights = sum(m.weight.numel() for m in layers.values())
    stored = sum(m.weight.numel() + m.weight_scale.numel() * m.weight_scale.element_size() for m in layers.values())
    return {"layers": len(layers), "weights": weights, "bytes": stored, "bits_per_weight": 8.0 * stored / max(weights, 1)}



def _default_run(model: nn.Module) -> Callable[[Any], Any]:
    def run(batch: Any) -> Any:
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
            return model(batch[0])
        return model(batch)

    return run


class Pt2eConvBackend(QuantizationBackend):
    """Static int8 ``nn.Conv1d`` / ``nn.Conv2d`` (PT2E's x86 recipe, calibrated input ranges), serving
    ``backend="torchao"`` beside the torchao int8 Linear backend."""

    name = "pt2e"
    family = "torchao"
    modes = ("int8",)
    layer_types = CONV_TYPES
    layer_kind = "convolutions"
    supports_ddp = False
    needs_calibration = True

    def require(self) -> Any:
        return require_torchao()

    def is_quantized(self, module: nn.Module) -> bool:
        return isinstance(module, Int8Conv)

    def can_quantize(self, module: nn.Module) -> bool:
        return why_not_int8_conv(module) is None

    def pick(self, model: nn.Module, candidates: Any, *, strict: bool) -> dict[str, nn.Module]:
        return select_int8_convs(model, dict(candidates), strict=strict)

    def quantize_(self, model: nn.Module, layers: Any, config: QuantConfig) -> dict[str, Any]:
        """Calibrates on ``config.calibration`` (run by ``config.run``), then swaps; returns the float convolutions.

        Raises:
            ValueError: convolutions to quantize but no ``calibration`` batches.
        """
        if not layers:
            return {}
        if config.calibration is None:
            raise ValueError(
                f"`calibration` batches are needed to quantize the convolutions {list(layers)[:5]} to static int8 (their "
                "input ranges are observed); pass calibration=[...] or exclude them (`exclude`)"
            )
        run = config.run if config.run is not None else _default_run(model)
        observers = calibrate_(model, dict(layers), config.calibration, run)
        return quantize_convs_int8_(model, dict(layers), observers)

    def restore_(self, model: nn.Module, originals: Any) -> None:
        restore_convs_(model, dict(originals))

    def restore_float_(self, model: nn.Module) -> list[str]:
        layers = int8_convs(model)
        for name, layer in layers.items():
            conv = layer.to_float()
            conv.train(layer.training)
            set_submodule(model, name, conv)
        return list(layers)

    def record(self, model: nn.Module, config: QuantConfig) -> dict[str, Any]:
        return {"convs": list(int8_convs(model))}

    def replay_(self, model: nn.Module, state: Any) -> None:
        replay_int8_convs_(model, list(state.get("convs") or []))

    def footprint(self, model: nn.Module) -> dict[str, Any]:
        return int8_conv_footprint(model)

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        return cast(Int8Conv, layer).dequantized_weight()

    def describe(self, config: QuantConfig) -> str:
        return "convolutions: static uint8 inputs calibrated on training batches x int8 weights per channel"


#: The PT2E int8 convolution backend, registered as ``"pt2e"`` (family ``"torchao"``).
PT2E = register_backend(Pt2eConvBackend())
