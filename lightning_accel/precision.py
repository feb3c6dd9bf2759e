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

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import MixedPrecision as _LightningAMP
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_accel._compose import AccelCallback, CompositionError
from lightning_accel._select import select_modules
from lightning_accel._validate import check_choice, check_int, check_number, check_patterns

__all__ = [
    "DTYPES",
    "MixedPrecision",
    "PrecisionChoice",
    "PrecisionNoEffectWarning",
    "PrecisionWarning",
    "choose_precision",
    "cpu_supports_bf16",
    "fp32_islands_",
    "remove_fp32_islands_",
    "resolve_precision",
]

DType = Literal["auto", "bf16", "fp16", "fp32"]
DTYPES: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}


class PrecisionWarning(UserWarning):
    """A precision was requested that the device only emulates (slow) or that needs care."""


class PrecisionNoEffectWarning(UserWarning):
    """A precision option has no effect (e.g. ``fp32_modules`` while training runs in float32)."""


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


def choose_precision(device: torch.device | str = "cpu") -> PrecisionChoice:
    """The autocast dtype ``device`` runs fastest without losing training stability, and the reason.

    * CUDA with native bf16 (compute capability >= 8.0, or ROCm with bf16): ``bfloat16``.
    * Other CUDA devices: ``float16`` (with dynamic loss scaling, which :class:`MixedPrecision` adds).
    * CPUs with AVX512-BF16 or AMX: ``bfloat16``.
    * Other CPUs and other devices: ``float32``. fp16 is never chosen on a CPU: it is emulated there and
      needs a loss scaler, so it is only used when asked for explicitly.

    >>> dtype, reason = choose_precision("cpu")

    Args:
        device: the training device, e.g. ``"cuda:0"``, ``torch.device("cpu")``.

    Returns:
        A :class:`PrecisionChoice` ``(dtype, reason)``.

    Raises:
        ValueError: ``device`` is not a device string or ``torch.device``.
    """
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
            return PrecisionChoice(torch.bfloat16, f"the CPU has {isa}: bf16 autocast runs natively")
        return PrecisionChoice(
            torch.float32,
            "the CPU has neither AVX512-BF16 nor AMX: bf16 would be emulated (slower than float32) and fp16 "
            "has no fast CPU kernels, so float32",
        )
    return PrecisionChoice(torch.float32, f"no mixed precision is chosen automatically on {dev.type!r} devices: float32")


def resolve_precision(dtype: str, device: torch.device | str = "cpu") -> PrecisionChoice:
    """Turn a request (``"auto"``, ``"bf16"``, ``"fp16"``, ``"fp32"``) into a :class:`PrecisionChoice` for ``device``.

    ``"auto"`` is :func:`choose_precision`. An explicit dtype is honoured; its reason says when the device
    only emulates it (bf16 on a CPU without AVX512-BF16/AMX or a pre-Ampere GPU; fp16 on any CPU).

    >>> resolve_precision("bf16", "cpu").dtype
    torch.bfloat16

    Args:
        dtype: the request, e.g. ``"auto"``.
        device: the training device, e.g. ``"cuda:0"``.

    Returns:
        A :class:`PrecisionChoice` ``(dtype, reason)``.

    Raises:
        ValueError: ``dtype`` is not one of :data:`DTYPES`.
    """
    check_choice("dtype", dtype, DTYPES)
    if dtype == "auto":
        return choose_precision(device)
    dev = _as_device(device)
    if dtype == "fp32":
        return PrecisionChoice(torch.float32, "float32 was requested")
    if dtype == "bf16":
        native = choose_precision(dev).dtype == torch.bfloat16
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


# ---------------------------------------------------------------------------------------------------------
# The Lightning plugin and callback
# ---------------------------------------------------------------------------------------------------------
class _AccelAMP(_LightningAMP):
    """Lightning's AMP plugin, counting the optimizer steps the loss scaler skips.

    The scaler state is saved by :class:`MixedPrecision` in its own callback state (restored before the
    strategy sets up), so this plugin contributes nothing of its own to the checkpoint.
    """

    def __init__(self, precision: str, device: str, scaler: torch.amp.GradScaler | None, owner: MixedPrecision) -> None:
        super().__init__(precision, device, scaler)  # type: ignore[arg-type]
        self.owner = owner

    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:  # type: ignore[override]
        if self.scaler is None:
            return super().optimizer_step(optimizer, model, closure, **kwargs)
        before = self.scaler.get_scale()
        out = super().optimizer_step(optimizer, model, closure, **kwargs)
        after = self.scaler.get_scale()
        # GradScaler.update() lowers the scale exactly when it found inf/NaN gradients and skipped the step
        if after < before:
            self.owner._skipped_steps += 1
        self.owner._scale = float(after)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {}


class MixedPrecision(AccelCallback):
    """Mixed-precision training chosen for the hardware, with float32 islands and visible loss scaling.

    From ``setup`` (before the strategy sets up) it installs Lightning's AMP precision plugin for the chosen
    dtype, so autocast covers the training, validation, test and predict steps. ``dtype="auto"`` picks bf16
    where the device runs it natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else fp16 with dynamic
    loss scaling on CUDA, else float32; the choice and its reason are logged once. With fp16 the optimizer
    steps that the loss scaler skips for non-finite gradients are counted and logged with the loss scale
    (``precision/skipped_steps``, ``precision/loss_scale``), and the scaler state is part of this callback's
    checkpoint state. Pipeline order 30: after pruning and quantization, before ``TorchCompile``.

    Example::

        MixedPrecision()                                            # bf16 here (AVX512-BF16), fp16 on a T4
        MixedPrecision(dtype="bf16", fp32_modules=["LayerNorm", "head"])

    Args:
        dtype: ``"auto"``, ``"bf16"``, ``"fp16"`` or ``"fp32"``, e.g. ``"auto"``. An explicit dtype is honoured
            even where the device only emulates it (with a :class:`PrecisionWarning`).
        fp32_modules: qualified-name or class-name glob patterns of modules computed in float32 inside the
            autocast region, e.g. ``["LayerNorm", "head"]`` (``None``: none).
        init_scale: initial fp16 loss scale, e.g. ``65536.0`` (fp16 only).
        growth_interval: consecutive finite steps before the fp16 loss scale doubles, e.g. ``2000`` (fp16 only).

    Raises:
        ValueError: a bad argument (raised here, before any model is touched).
        CompositionError: at ``setup``, the Trainer already sets a precision (``precision="bf16-mixed"`` or a
            precision plugin), or a second ``MixedPrecision`` is present.
        NoMatchError: at ``setup``, a ``fp32_modules`` pattern matches no module.
    """

    order = 30

    def __init__(
        self,
        dtype: DType = "auto",
        fp32_modules: list[str] | None = None,
        init_scale: float = 65536.0,
        growth_interval: int = 2000,
    ) -> None:
        check_choice("dtype", dtype, DTYPES)
        check_patterns("fp32_modules", fp32_modules)
        check_number("init_scale", init_scale, low=0.0, low_inclusive=False)
        if init_scale == float("inf"):
            raise ValueError(f"`init_scale` must be a finite number > 0; got {init_scale!r}")
        check_int("growth_interval", growth_interval, low=1)
        self.dtype = dtype
        self.fp32_modules = list(fp32_modules) if fp32_modules else None
        self.init_scale = float(init_scale)
        self.growth_interval = growth_interval
        self.choice: PrecisionChoice | None = None
        self.fp32_module_names: list[str] = []
        self._skipped_steps = 0
        self._scale: float | None = None
        self._logged: dict[str, float] = {}
        self._plugin: _AccelAMP | None = None
        self._replaced: Precision | None = None
        self._pending_scaler: dict[str, Any] | None = None
        self._logged_choice = False

    # -- composition ---------------------------------------------------------------------------------------
    def conflicts_with(self, other: AccelCallback) -> str | None:
        if isinstance(other, MixedPrecision):
            return "both would install a precision plugin; keep one MixedPrecision callback"
        return None

    # -- set-up ----------------------------------------------------------------------------------------------
    def accel_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        current = trainer.strategy.precision_plugin
        if not isinstance(current, _AccelAMP):
            _check_no_precision_set(trainer, current, self)
        device = trainer.strategy.root_device
        self.choice = resolve_precision(self.dtype, device)
        if not self._logged_choice:
            rank_zero_info(f"MixedPrecision(dtype={self.dtype!r}): {self.choice.name} on {device.type}: {self.choice.reason}")
            self._logged_choice = True
        if self.dtype != "auto" and "emulated" in self.choice.reason:
            rank_zero_warn(f"MixedPrecision: {self.choice.reason}", category=PrecisionWarning)
        if self.choice.dtype == torch.float32:
            self._plugin = None
            if self.fp32_modules:
                rank_zero_warn(
                    f"MixedPrecision: `fp32_modules`={self.fp32_modules} has no effect: training runs in float32 "
                    f"({self.choice.reason})",
                    category=PrecisionNoEffectWarning,
                )
            return
        scaler = None
        if self.choice.dtype == torch.float16:
            scaler = torch.amp.GradScaler(device.type, init_scale=self.init_scale, growth_interval=self.growth_interval)
            if self._pending_scaler:
                scaler.load_state_dict(self._pending_scaler)
        precision = "bf16-mixed" if self.choice.dtype == torch.bfloat16 else "16-mixed"
        self._plugin = _AccelAMP(precision, device.type, scaler, self)
        if not isinstance(current, _AccelAMP):
            self._replaced = current
        trainer.strategy.precision_plugin = self._plugin
        if self.fp32_modules:
            self.fp32_module_names = fp32_islands_(pl_module, self.fp32_modules)
            rank_zero_info(f"MixedPrecision: float32 islands: {', '.join(self.fp32_module_names)}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        remove_fp32_islands_(pl_module)
        if self._plugin is not None and trainer.strategy.precision_plugin is self._plugin:
            if self._plugin.scaler is not None:  # keep the scale for a later stage of the same callback
                self._pending_scaler = self._plugin.scaler.state_dict()
            if self._replaced is not None:
                trainer.strategy.precision_plugin = self._replaced
        self._plugin = None

    # -- progress and logging -------------------------------------------------------------------------------
    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped by the fp16 loss scaler for non-finite gradients (across resumes)."""
        return self._skipped_steps

    @property
    def loss_scale(self) -> float | None:
        """The current fp16 loss scale (``None`` when no scaler is active)."""
        if self._plugin is not None and self._plugin.scaler is not None:
            return float(self._plugin.scaler.get_scale())
        if self._pending_scaler:
            return float(self._pending_scaler["scale"])
        return None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._plugin is None or self._plugin.scaler is None:
            return
        scale = self._scale if self._scale is not None else float(self._plugin.scaler.get_scale())
        values = {"precision/loss_scale": scale, "precision/skipped_steps": float(self._skipped_steps)}
        if values != self._logged or trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._logged = values  # log when the scale or the count changed, else at the Trainer's log interval
            for k, v in values.items():
                pl_module.log(k, v, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._plugin is not None and self._plugin.scaler is not None:
            rank_zero_info(
                f"MixedPrecision: {self._skipped_steps} optimizer step(s) skipped for non-finite fp16 gradients; "
                f"final loss scale {self._plugin.scaler.get_scale():g}"
            )

    # -- checkpoint state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        scaler = None
        if self._plugin is not None and self._plugin.scaler is not None:
            scaler = self._plugin.scaler.state_dict()
        elif self._pending_scaler:
            scaler = dict(self._pending_scaler)
        return {
            "dtype": self.choice.name if self.choice is not None else None,
            "skipped_steps": self._skipped_steps,
            "scaler": scaler,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._skipped_steps = int(state_dict.get("skipped_steps", 0))
        saved, scaler = state_dict.get("dtype"), state_dict.get("scaler")
        if self.choice is not None and saved is not None and saved != self.choice.name:
            rank_zero_warn(
                f"MixedPrecision: the checkpoint was trained with {saved}, this run uses {self.choice.name} "
                f"({self.choice.reason})",
                category=PrecisionWarning,
            )
        if not scaler:
            return
        self._pending_scaler = dict(scaler)
        if self._plugin is not None and self._plugin.scaler is not None:
            self._plugin.scaler.load_state_dict(scaler)


def _check_no_precision_set(trainer: pl.Trainer, plugin: Precision, cb: MixedPrecision) -> None:
    """Raise when the Trainer already chose a precision other than the default ``"32-true"``."""
    if type(plugin) is Precision:
        return
    precision = getattr(plugin, "precision", None)
    if type(plugin).__module__.startswith("lightning.") and precision != "32-true":
        what = f"Trainer(precision={precision!r})"
    else:
        what = f"the precision plugin {type(plugin).__name__} (precision={precision!r}) set on the Trainer or its strategy"
    raise CompositionError(
        f"MixedPrecision(dtype={cb.dtype!r}) cannot be combined with {what}: both choose the training precision. "
        "Remove `precision=`/the precision plugin from the Trainer (MixedPrecision(dtype='bf16') is the "
        "equivalent of 'bf16-mixed', dtype='fp16' of '16-mixed'), or remove the MixedPrecision callback."
    )
