"""Mixed precision chosen for the hardware, with float32 islands and visible loss scaling.

Two layers, as for every technique:

* the pure core: :func:`choose_precision` (which autocast dtype a device runs natively, and why),
  :func:`resolve_precision` (an explicit ``"bf16"``/``"fp16"``/``"fp32"``/``"auto"`` request on a device) and
  :func:`fp32_islands_` / :func:`remove_fp32_islands_` (modules computed in float32 inside an autocast
  region, with no change to ``state_dict`` keys);
* the :class:`MixedPrecision` callback, which installs a Lightning AMP precision plugin from ``setup`` (before
  the strategy sets up), counts the optimizer steps the fp16 loss scaler skips, logs
  ``precision/loss_scale`` and ``precision/skipped_steps``, and keeps the scaler state in its own checkpoint
  state so a resumed fp16 run continues with the scale it had.

    from lightning_accel import MixedPrecision
    trainer = Trainer(callbacks=[MixedPrecision("auto", fp32_modules=["LayerNorm", "head"])])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from lightning_accel._select import select_modules
from lightning_accel._validate import check_choice, check_patterns
from lightning_accel.errors import PrecisionNoEffectWarning, PrecisionWarning  # noqa: F401 (public here too)

__all__ = [
    "CPU_BF16_MIN_WEIGHT",
    "DTYPES",
    "PrecisionChoice",
    "PrecisionNoEffectWarning",
    "PrecisionWarning",
    "choose_precision",
    "cpu_supports_bf16",
    "fp32_islands_",
    "largest_linear_weight",
    "remove_fp32_islands_",
    "resolve_precision",
]

DType = Literal["auto", "bf16", "fp16", "fp32"]
DTYPES: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}
#: On a CPU, bf16 autocast pays for its casts in a model of Linear layers only when its largest Linear weight has at
#: least this many elements (256 x 256). Measured on a 2-core AVX512-BF16 CPU (no AMX), train step bf16 / fp32 of
#: ``DigitsTransformer`` at batch 64: width 64 (largest weight 12,288) 1.35x (slower), 128 (49,152) 0.99x,
#: 256 (196,608) 0.82x, 384 0.72x. Convolutions gain even when narrow (``ResidualCNN(width=32)``, 9,216-element
#: weights: 0.68x), so a model with a convolution keeps bf16.
CPU_BF16_MIN_WEIGHT = 65_536
_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class PrecisionChoice(NamedTuple):
    """An autocast dtype and why it was chosen; unpacks as ``dtype, reason = choice``."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        """``"bf16"``, ``"fp16"`` or ``"fp32"``."""
        return _NAMES[self.dtype]


# ---------------------------------------------------------------------------------------------------------
# Core: choosing a dtype
# ---------------------------------------------------------------------------------------------------------
def cpu_supports_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), and the instruction set found."""
    found = []
    if torch.cpu._is_avx512_bf16_supported():
        found.append("AVX512-BF16")
    if torch.cpu._is_amx_tile_supported():
        found.append("AMX")
    return bool(found), " and ".join(found)


def largest_linear_weight(model: nn.Module) -> int:
    """Elements of the largest ``nn.Linear`` weight in ``model`` (0 when it has none): the size that decides whether
    bf16 autocast pays off on a CPU for a model without convolutions (:data:`CPU_BF16_MIN_WEIGHT`)."""
    sizes = [m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and isinstance(getattr(m, "weight", None), torch.Tensor)]
    return max(sizes, default=0)


def _cpu_bf16_too_small(model: nn.Module | None) -> str | None:
    """Why bf16 autocast would be slower than float32 for ``model`` on a CPU, or ``None``."""
    if model is None or any(isinstance(m, _CONVS) for m in model.modules()):
        return None
    size = largest_linear_weight(model)
    if size == 0 or size >= CPU_BF16_MIN_WEIGHT:
        return None
    return (
        f"the model's largest Linear weight has {size:,} elements (< {CPU_BF16_MIN_WEIGHT:,}): at this size bf16 "
        "autocast on a CPU costs more in casts than its matmuls save"
    )


def _check_model(model: Any) -> None:
    if model is not None and not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module or None; got {type(model).__name__}")


def choose_precision(device: torch.device | str = "cpu", model: nn.Module | None = None) -> PrecisionChoice:
    """The autocast dtype ``device`` runs fastest without losing training stability, and the reason.

    * CUDA with native bf16 (compute capability >= 8.0, or ROCm with bf16): ``bfloat16``.
    * Other CUDA devices: ``float16`` (with dynamic loss scaling, which :class:`MixedPrecision` adds).
    * CPUs with AVX512-BF16 or AMX: ``bfloat16``, unless ``model`` is given and is too narrow for bf16 to pay
      off on a CPU (no convolution, and its largest Linear weight has fewer than :data:`CPU_BF16_MIN_WEIGHT`
      elements): then ``float32``.
    * Other CPUs and other devices: ``float32``. fp16 is never chosen on a CPU: it is emulated there and
      needs a loss scaler, so it is only used when asked for explicitly.

    >>> dtype, reason = choose_precision("cpu")

    Args:
        device: the training device, e.g. ``"cuda:0"``, ``torch.device("cpu")``.
        model: the model to be trained, e.g. ``pl_module`` (``None``: choose from the device alone).

    Returns:
        A :class:`PrecisionChoice` ``(dtype, reason)``.

    Raises:
        ValueError: ``device`` is not a device string or ``torch.device``; ``model`` is not a module.
    """
    _check_model(model)
    dev = _as_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return PrecisionChoice(torch.float32, "CUDA was requested but is not available: float32")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        major, minor = torch.cuda.get_device_capability(index)
        with torch.cuda.device(index):
            native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if native_bf16:
            return PrecisionChoice(torch.bfloat16, f"{name} (compute capability {major}.{minor}) runs bf16 natively")
        return PrecisionChoice(
            torch.float16,
            f"{name} (compute capability {major}.{minor}) has no native bf16: fp16 with dynamic loss scaling",
        )
    if dev.type == "cpu":
        native, isa = cpu_supports_bf16()
        if native:
            small = _cpu_bf16_too_small(model)
            if small is not None:
                return PrecisionChoice(torch.float32, f"the CPU has {isa}, but {small}: float32")
            return PrecisionChoice(torch.bfloat16, f"the CPU has {isa}: bf16 autocast runs natively")
        return PrecisionChoice(
            torch.float32,
            "the CPU has neither AVX512-BF16 nor AMX: bf16 would be emulated (slower than float32) and fp16 "
            "has no fast CPU kernels, so float32",
        )
    return PrecisionChoice(torch.float32, f"no mixed precision is chosen automatically on {dev.type!r} devices: float32")


def resolve_precision(dtype: str, device: torch.device | str = "cpu", model: nn.Module | None = None) -> PrecisionChoice:
    """Turn a request (``"auto"``, ``"bf16"``, ``"fp16"``, ``"fp32"``) into a :class:`PrecisionChoice` for ``device``.

    ``"auto"`` is :func:`choose_precision`. An explicit dtype is honoured; its reason says when the device
    only emulates it (bf16 on a CPU without AVX512-BF16/AMX or a pre-Ampere GPU; fp16 on any CPU).

    >>> resolve_precision("bf16", "cpu").dtype
    torch.bfloat16

    Args:
        dtype: the request, e.g. ``"auto"``.
        device: the training device, e.g. ``"cuda:0"``.
        model: the model to be trained, e.g. ``pl_module`` (``None``: decide from the device alone); ``"auto"``
            on a CPU picks float32 for a model too narrow for bf16 to pay off, and an explicit ``"bf16"`` says so.

    Returns:
        A :class:`PrecisionChoice` ``(dtype, reason)``.

    Raises:
        ValueError: ``dtype`` is not one of :data:`DTYPES`; ``model`` is not a module.
    """
    check_choice("dtype", dtype, DTYPES)
    _check_model(model)
    if dtype == "auto":
        return choose_precision(device, model)
    dev = _as_device(device)
    if dtype == "fp32":
        return PrecisionChoice(torch.float32, "float32 was requested")
    if dtype == "bf16":
        native = choose_precision(dev).dtype == torch.bfloat16
        small = _cpu_bf16_too_small(model) if native and dev.type == "cpu" else None
        if small is not None:
            note = f"runs natively, but {small}, so it may be slower than float32"
        else:
            note = "runs natively" if native else "is emulated on this device and may be slower than float32"
        return PrecisionChoice(torch.bfloat16, f"bf16 was requested; it {note}")
    if dev.type == "cpu":
        return PrecisionChoice(
            torch.float16, "fp16 was requested; on a CPU it is emulated (slow) and uses a CPU loss scaler"
        )
    return PrecisionChoice(torch.float16, "fp16 was requested: fp16 with dynamic loss scaling")


def _as_device(device: torch.device | str) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if isinstance(device, str):
        try:
            return torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"`device` must be a device like 'cpu' or 'cuda:0'; got {device!r}") from err
    raise ValueError(f"`device` must be a device string or torch.device like 'cpu' or 'cuda:0'; got {device!r}")


# ---------------------------------------------------------------------------------------------------------
# Core: float32 islands
# ---------------------------------------------------------------------------------------------------------
class _Fp32Forward:
    """Instance-level ``forward`` of an island: autocast off, low-precision floating inputs cast to float32.

    It is stored in the module's ``__dict__`` (no new submodule, no parameter or buffer), so ``state_dict``
    keys stay the model's own; hooks registered on the module still run around it.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.inner: Callable[..., Any] | None = module.__dict__.get("forward")  # an earlier instance forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = self.inner if self.inner is not None else type(self.module).forward.__get__(self.module)
        device_type = _device_type(args, kwargs, self.module)
        if device_type is None or not torch.is_autocast_enabled(device_type):
            return call(*args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return call(*_to_fp32(args), **_to_fp32(kwargs))


def _device_type(args: Any, kwargs: Any, module: nn.Module) -> str | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device.type
    for p in module.parameters():
        return p.device.type
    return None


def _to_fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if isinstance(value, tuple):
        return tuple(_to_fp32(v) for v in value)
    if isinstance(value, list):
        return [_to_fp32(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_fp32(v) for k, v in value.items()}
    return value


def fp32_islands_(model: nn.Module, patterns: list[str]) -> list[str]:
    """Compute the modules matching ``patterns`` in float32 inside any autocast region (in place).

    A matched module runs with autocast disabled and its bf16/fp16 floating inputs cast to float32, so its
    outputs are float32; outside autocast it behaves exactly as before. Nested matches are islands through
    their outermost match. Applying it twice is harmless.

    >>> fp32_islands_(model, ["LayerNorm", "head"])
    ['blocks.0.norm1', ..., 'head']

    Args:
        model: the model to change.
        patterns: glob patterns on qualified names (``"blocks.*.norm1"``) or class names (``"LayerNorm"``).

    Returns:
        The qualified names of the island modules.

    Raises:
        NoMatchError: a pattern matches no module.
        ValueError: ``patterns`` is not a non-empty list of strings.
    """
    patterns = check_patterns("fp32_modules", patterns) or []
    if not patterns:
        raise ValueError("`fp32_modules` must be a non-empty list of glob patterns like ['LayerNorm']; got []")
    selected = select_modules(model, patterns, types=(nn.Module,), what="fp32_modules")
    outermost = [n for n in selected if not any(n.startswith(o + ".") for o in selected if o != n)]
    for name in outermost:
        module = selected[name]
        if not isinstance(module.__dict__.get("forward"), _Fp32Forward):
            module.forward = _Fp32Forward(module)  # type: ignore[method-assign]
    return outermost


def remove_fp32_islands_(model: nn.Module) -> list[str]:
    """Undo :func:`fp32_islands_` everywhere in ``model``; returns the names restored."""
    restored = []
    for name, module in model.named_modules():
        fwd = module.__dict__.get("forward")
        if isinstance(fwd, _Fp32Forward):
            if fwd.inner is None:
                del module.__dict__["forward"]
            else:
                module.forward = fwd.inner  # type: ignore[method-assign]
            restored.append(name)
    return restored
